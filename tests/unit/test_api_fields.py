"""Every field of OpenAI's own request types is honoured or refused, never accepted and ignored.

The fields come from the installed ``openai`` package (its TypedDicts for chat completions,
completions and embeddings), so a field it adds later fails
`test_every_openai_field_is_decided` until edgefleet.agent.api.field_table says what it means
here. Each honoured field must be one the request models declare (an undeclared field would
be dropped silently, as unknown fields are ignored) and must take ``null`` as its default;
each refused one must get a 400 naming it. Runs against the scripted fake runtime of
tests/unit/test_api.py.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import pytest
from fastapi.testclient import TestClient
from openai.types import completion_create_params, embedding_create_params
from openai.types.chat import completion_create_params as chat_create_params
from pydantic import BaseModel

from edgefleet.agent.api import create_app
from edgefleet.agent.api.field_table import (
    CHAT,
    COMPLETIONS,
    EMBEDDINGS,
    Disposition,
    Honoured,
    Refusal,
    ToolsWork,
)
from edgefleet.agent.api.protocol import ChatCompletionRequest, CompletionRequest, EmbeddingRequest
from edgefleet.agent.runtimes.model_table import ModelTable
from tests.unit.test_api import MODEL, FakeRuntime, assert_openai_error, chat_body, completion_body


def _keys(*typed_dicts: Any) -> set[str]:
    keys: set[str] = set()
    for typed_dict in typed_dicts:
        keys |= set(typed_dict.__required_keys__) | set(typed_dict.__optional_keys__)
    return keys


ENDPOINTS: Mapping[str, tuple[str, set[str], Mapping[str, Disposition], type[BaseModel], dict[str, Any]]] = {
    "chat": (
        "/v1/chat/completions",
        _keys(
            chat_create_params.CompletionCreateParamsStreaming,
            chat_create_params.CompletionCreateParamsNonStreaming,
        ),
        CHAT,
        ChatCompletionRequest,
        chat_body(),
    ),
    "completions": (
        "/v1/completions",
        _keys(
            completion_create_params.CompletionCreateParamsStreaming,
            completion_create_params.CompletionCreateParamsNonStreaming,
        ),
        COMPLETIONS,
        CompletionRequest,
        completion_body(),
    ),
    "embeddings": (
        "/v1/embeddings",
        _keys(embedding_create_params.EmbeddingCreateParams),
        EMBEDDINGS,
        EmbeddingRequest,
        {"model": MODEL, "input": "hello"},
    ),
}
REQUIRED = frozenset({"model", "messages", "prompt", "input"})

CASES = [
    (endpoint, field, table.get(field))
    for endpoint, (_, fields, table, _, _) in ENDPOINTS.items()
    for field in sorted(fields)
]


@pytest.fixture
def client() -> Iterator[TestClient]:
    app = create_app(models=ModelTable(FakeRuntime()), observer=lambda stats: None)
    with TestClient(app, raise_server_exceptions=False) as test_client:
        yield test_client


@pytest.mark.parametrize("endpoint", sorted(ENDPOINTS))
def test_every_openai_field_is_decided(endpoint: str) -> None:
    _, fields, table, _, _ = ENDPOINTS[endpoint]
    undecided = sorted(fields - set(table))
    assert not undecided, (
        f"the openai package's {endpoint} request has fields edgefleet.agent.api.field_table does not "
        f"decide: {undecided}; honour each one or refuse it with a 400, and add it to the table"
    )


@pytest.mark.parametrize(("endpoint", "field", "disposition"), CASES, ids=[f"{e}-{f}" for e, f, _ in CASES])
def test_each_field_is_honoured_or_refused(
    client: TestClient, endpoint: str, field: str, disposition: Disposition | None
) -> None:
    path, _, _, model, body = ENDPOINTS[endpoint]
    assert disposition is not None, f"{endpoint}.{field} is not in the field table"
    # Declared, so never dropped by extra="ignore": it is validated, then used or refused.
    assert field in model.model_fields, f"{model.__name__} does not declare {field}"
    if isinstance(disposition, Refusal):
        response = client.post(path, json={**body, field: disposition.example})
        error = assert_openai_error(response, 400)
        assert error["param"] == field and error["message"].startswith(f"{field}: "), error
        assert len(error["message"]) > len(field) + 20  # says why, not only "invalid"
    else:
        assert isinstance(disposition, Honoured | ToolsWork)
    if field not in REQUIRED:  # null means the default, for honoured and refused fields alike
        response = client.post(path, json={**body, field: None})
        assert response.status_code == 200, response.text


@pytest.mark.parametrize(
    ("path", "fields"),
    [
        ("/v1/chat/completions", {"n": 1, "store": False, "service_tier": "auto", "modalities": ["text"]}),
        ("/v1/completions", {"n": 1, "best_of": 1, "suffix": "", "echo": False}),
        ("/v1/chat/completions", {"stream_options": {"include_usage": None, "include_obfuscation": False}}),
    ],
)
def test_values_that_ask_for_nothing_are_accepted(
    client: TestClient, path: str, fields: dict[str, Any]
) -> None:
    body = chat_body() if "chat" in path else completion_body()
    assert client.post(path, json={**body, **fields}).status_code == 200


@pytest.mark.parametrize(
    ("endpoint", "field"),
    [
        (endpoint, field)
        for endpoint, fields in {
            "chat": ("stream", "n", "frequency_penalty", "presence_penalty", "logprobs"),
            "completions": ("stream", "echo", "max_tokens", "n", "best_of", "suffix"),
        }.items()
        for field in fields
    ],
)
def test_null_is_the_default_not_a_400(client: TestClient, endpoint: str, field: str) -> None:
    path, _, _, _, body = ENDPOINTS[endpoint]
    response = client.post(path, json={**body, field: None})
    assert response.status_code == 200, response.text
    choice = response.json()["choices"][0]
    assert choice["finish_reason"] in ("stop", "length")


def test_obfuscation_is_refused_naming_it(client: TestClient) -> None:
    body = chat_body(stream=True, stream_options={"include_obfuscation": True})
    error = assert_openai_error(client.post("/v1/chat/completions", json=body), 400)
    assert error["param"] == "stream_options.include_obfuscation"
