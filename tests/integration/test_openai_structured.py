"""Structured output through the official `openai` client against a real agent on real SmolLM2:
every reply parses (and validates against its schema), streamed or not."""

from __future__ import annotations

import json
from typing import Any

import jsonschema
import openai
import pydantic
import pytest

from tests.integration.openai_agent import MODEL_ID, openai_client, smollm2_runtime

pytestmark = pytest.mark.integration
__all__ = ["openai_client", "smollm2_runtime"]

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "languages": {"type": "array", "items": {"type": "string", "maxLength": 20}, "maxItems": 3},
    },
    "required": ["name", "age", "languages"],
    "additionalProperties": False,
}
ASK = [{"role": "user", "content": "Describe a French software engineer as JSON."}]
SCHEMA_FORMAT: Any = {
    "type": "json_schema",
    "json_schema": {"name": "person", "schema": PERSON, "strict": True},
}


def streamed(client: openai.OpenAI, **kwargs: Any) -> tuple[str, str | None]:
    chunks = list(client.chat.completions.create(model=MODEL_ID, stream=True, **kwargs))
    text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    return text, chunks[-1].choices[0].finish_reason


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_json_object_parses(openai_client: openai.OpenAI, temperature: float) -> None:
    response = openai_client.chat.completions.create(
        model=MODEL_ID,
        messages=ASK,  # type: ignore[arg-type]
        response_format={"type": "json_object"},
        max_tokens=200,
        temperature=temperature,
        seed=3,
    )
    assert response.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(response.choices[0].message.content or ""), dict)


def test_json_object_streamed_parses(openai_client: openai.OpenAI) -> None:
    text, finish = streamed(
        openai_client, messages=ASK, response_format={"type": "json_object"}, max_tokens=200, temperature=0
    )
    assert finish == "stop"
    assert isinstance(json.loads(text), dict)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_json_schema_validates(openai_client: openai.OpenAI, seed: int) -> None:
    response = openai_client.chat.completions.create(
        model=MODEL_ID,
        messages=ASK,  # type: ignore[arg-type]
        response_format=SCHEMA_FORMAT,
        max_tokens=200,
        temperature=0.8,
        seed=seed,
    )
    assert response.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(response.choices[0].message.content or ""), PERSON)


def test_json_schema_streamed_validates(openai_client: openai.OpenAI) -> None:
    text, finish = streamed(
        openai_client, messages=ASK, response_format=SCHEMA_FORMAT, max_tokens=200, temperature=0
    )
    assert finish == "stop"
    jsonschema.validate(json.loads(text), PERSON)


class City(pydantic.BaseModel):
    name: str = pydantic.Field(max_length=40)
    country: str = pydantic.Field(max_length=40)
    population: int = pydantic.Field(ge=0, le=100_000_000)


def test_client_parse_with_a_pydantic_model(openai_client: openai.OpenAI) -> None:
    completion = openai_client.chat.completions.parse(
        model=MODEL_ID,
        messages=[{"role": "user", "content": "Tell me about Paris."}],
        response_format=City,
        max_tokens=120,
        temperature=0,
    )
    parsed = completion.choices[0].message.parsed
    assert isinstance(parsed, City) and parsed.name


def test_grammar_extension(openai_client: openai.OpenAI) -> None:
    response = openai_client.chat.completions.create(
        model=MODEL_ID,
        messages=[{"role": "user", "content": "Is Paris in France? Answer yes or no."}],
        max_tokens=8,
        temperature=0,
        extra_body={
            "response_format": {"type": "grammar", "syntax": "gbnf", "grammar": 'root ::= "yes" | "no"'}
        },
    )
    assert response.choices[0].message.content in ("yes", "no")


def test_an_uncompilable_schema_is_a_400(openai_client: openai.OpenAI) -> None:
    bad: Any = {
        "type": "json_schema",
        "json_schema": {"name": "x", "schema": {"type": "nonsense"}, "strict": True},
    }
    with pytest.raises(openai.BadRequestError) as refused:
        openai_client.chat.completions.create(model=MODEL_ID, messages=ASK, response_format=bad)  # type: ignore[arg-type]
    assert refused.value.body is not None and "response_format" in str(refused.value.body)
