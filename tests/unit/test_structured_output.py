"""Structured output: schemas and grammars compile (or are refused, naming the problem) before
any model is asked; bounds on schema size and depth; the API's 400s."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient

from edgefleet.agent.api import create_app
from edgefleet.agent.runtimes.base import ConstraintError
from edgefleet.agent.runtimes.constraints import (
    MAX_SCHEMA_DEPTH,
    json_schema_grammar,
    lark_grammar,
)
from edgefleet.agent.runtimes.model_table import ModelTable
from tests.unit.test_api import MODEL, FakeRuntime, Recorder, assert_openai_error

PERSON = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "age": {"type": "integer", "minimum": 0}},
    "required": ["name", "age"],
    "additionalProperties": False,
}


def nested(depth: int) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "string"}
    for _ in range(depth):
        schema = {"type": "array", "items": schema}
    return schema


def test_schemas_and_grammars_compile() -> None:
    assert json_schema_grammar(PERSON)
    assert json_schema_grammar(None)  # json_object: any object
    assert lark_grammar('root ::= "yes" | "no"', gbnf=True)
    assert lark_grammar('start: "yes" | "no"')


@pytest.mark.parametrize(
    ("schema", "problem"),
    [
        ({"type": "nonsense"}, "cannot be compiled"),
        (nested(MAX_SCHEMA_DEPTH), "nested deeper"),
        ({"type": "array", "uniqueItems": True}, "uniqueItems"),  # not enforceable: refused, not ignored
        ({"type": "object", "description": "x" * 70_000}, "larger than"),
    ],
)
def test_bad_or_oversized_schemas_are_refused(schema: dict[str, Any], problem: str) -> None:
    with pytest.raises(ConstraintError, match=problem):
        json_schema_grammar(schema)


def test_bad_grammar_is_refused() -> None:
    with pytest.raises(ConstraintError):
        lark_grammar("root ::= undefined_rule", gbnf=True)


@pytest.fixture
def client() -> Iterator[TestClient]:
    app = create_app(models=ModelTable(FakeRuntime(reply="{}")), observer=Recorder())
    with TestClient(app, raise_server_exceptions=False) as test_client:
        yield test_client


def chat(**fields: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"model": MODEL, "messages": [{"role": "user", "content": "Who?"}]}
    body.update(fields)
    return body


@pytest.mark.parametrize(
    "response_format",
    [
        {"type": "json_schema", "json_schema": {"name": "p", "schema": {"type": "nonsense"}, "strict": True}},
        {"type": "json_schema", "json_schema": {"name": "p", "schema": nested(MAX_SCHEMA_DEPTH)}},
        {"type": "grammar", "grammar": "root ::= nowhere"},
    ],
)
def test_uncompilable_formats_are_400s_naming_response_format(
    client: TestClient, response_format: dict[str, Any]
) -> None:
    response = client.post("/v1/chat/completions", json=chat(response_format=response_format))
    error = assert_openai_error(response, 400, "invalid_schema")
    assert error["param"] == "response_format"


def test_text_format_is_plain_and_malformed_formats_are_refused(client: TestClient) -> None:
    plain = client.post("/v1/chat/completions", json=chat(response_format={"type": "text"}))
    assert plain.status_code == 200, plain.text
    for bad in (
        {"type": "xml"},
        {"type": "json_schema"},
        {"type": "json_schema", "json_schema": {"name": "a b"}},
    ):
        error = assert_openai_error(client.post("/v1/chat/completions", json=chat(response_format=bad)), 400)
        assert error["param"] is not None and error["param"].startswith("response_format")
