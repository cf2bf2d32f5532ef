"""/openapi.json describes what the API really does (the fuzz test relies on it)."""

from __future__ import annotations

from typing import Any

import pytest
from fastapi.testclient import TestClient

from edgefleet.agent.api import create_app
from edgefleet.agent.api.protocol import MAX_NAME_CHARS, MAX_STOP_CHARS, MAX_TOKENS
from edgefleet.agent.runtimes.model_table import ModelTable
from tests.unit.test_api import FakeRuntime

MODEL_ROUTES = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings")


@pytest.fixture(scope="module")
def spec() -> dict[str, Any]:
    app = create_app(models=ModelTable(FakeRuntime()), observer=lambda stats: None)
    with TestClient(app) as client:
        response = client.get("/openapi.json")
    assert response.status_code == 200
    body: dict[str, Any] = response.json()
    return body


def test_every_route_is_documented(spec: dict[str, Any]) -> None:
    assert set(spec["paths"]) >= {
        "/v1/models",
        "/v1/models/{model}",
        *MODEL_ROUTES,
        "/tokenize",
        "/detokenize",
        "/healthz",
        "/metrics",
    }


@pytest.mark.parametrize("path", MODEL_ROUTES)
def test_model_routes_document_openai_errors_not_422(spec: dict[str, Any], path: str) -> None:
    responses = spec["paths"][path]["post"]["responses"]
    assert set(responses) == {"200", "400", "404", "408", "413", "429", "500", "503"}
    for status in ("400", "404", "408", "413", "429", "500", "503"):
        schema = responses[status]["content"]["application/json"]["schema"]
        assert schema == {"$ref": "#/components/schemas/ErrorResponse"}
    assert "Retry-After" in responses["429"]["headers"]
    assert "HTTPValidationError" not in spec["components"]["schemas"]


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
def test_streams_document_their_events(spec: dict[str, Any], path: str) -> None:
    event = spec["paths"][path]["post"]["responses"]["200"]["content"]["text/event-stream"]["schema"]
    data = event["properties"]["data"]["anyOf"]
    assert {"const": "[DONE]"} in data
    refs = [ref["$ref"] for ref in data[1]["contentSchema"]["anyOf"]]
    for ref in refs:
        assert ref.rsplit("/", 1)[1] in spec["components"]["schemas"]


def test_request_schemas_say_what_is_refused(spec: dict[str, Any]) -> None:
    schemas = spec["components"]["schemas"]
    chat = schemas["ChatCompletionRequest"]["properties"]
    assert (chat["n"]["anyOf"][0]["minimum"], chat["n"]["anyOf"][0]["maximum"]) == (1, 8)
    assert chat["audio"]["enum"] == [None] and chat["store"]["enum"] == [None, False]
    completion = schemas["CompletionRequest"]["properties"]
    assert completion["suffix"]["enum"] == [None, ""]
    assert completion["best_of"]["enum"] == [None, 1]
    assert {"type": "null"} in completion["echo"]["anyOf"]
    embedding = schemas["EmbeddingRequest"]
    assert embedding["required"] == ["model", "input"]
    assert embedding["properties"]["encoding_format"]["anyOf"][0]["enum"] == ["float", "base64"]
    assert chat["model"]["maxLength"] == MAX_NAME_CHARS
    stop_string, stop_list, _ = chat["stop"]["anyOf"]
    assert stop_string["maxLength"] == stop_list["items"]["maxLength"] == MAX_STOP_CHARS
    assert chat["max_tokens"]["anyOf"][0]["maximum"] == MAX_TOKENS


def test_metrics_are_documented_as_text(spec: dict[str, Any]) -> None:
    assert "text/plain" in spec["paths"]["/metrics"]["get"]["responses"]["200"]["content"]
