"""/api/* in process, on a fake runtime: Ollama's shapes, its error body, refusals, keys, counts."""

from __future__ import annotations

import json
from typing import Any

import pytest
from fastapi.testclient import TestClient

from edgefleet.agent.api import create_app
from edgefleet.agent.api.auth import require_api_key
from edgefleet.agent.runtimes.model_table import ModelTable
from edgefleet.agent.stats import InferenceStats
from tests.unit.test_api import MODEL, REPLY, FakeRuntime

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
FIGURES = ("total_duration", "load_duration", "prompt_eval_count", "prompt_eval_duration", "eval_count")
MANAGEMENT = [
    ("POST", "/api/pull"),
    ("POST", "/api/push"),
    ("POST", "/api/create"),
    ("POST", "/api/copy"),
    ("DELETE", "/api/delete"),
    ("POST", "/api/blobs/sha256:00"),
    ("HEAD", "/api/blobs/sha256:00"),
]


@pytest.fixture
def seen() -> list[InferenceStats]:
    return []


@pytest.fixture
def client(seen: list[InferenceStats]) -> TestClient:
    return TestClient(create_app(models=ModelTable(FakeRuntime()), observer=seen.append))


def lines(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines() if line]


def test_chat_without_streaming(client: TestClient, seen: list[InferenceStats]) -> None:
    response = client.post("/api/chat", json={"model": MODEL, "messages": QUESTION, "stream": False})
    assert response.status_code == 200
    body = response.json()
    assert list(body)[:5] == ["model", "created_at", "message", "done", "done_reason"]
    assert body["message"] == {"role": "assistant", "content": REPLY}
    assert body["done"] is True and body["done_reason"] == "stop"
    assert body["created_at"].endswith("Z")
    assert all(isinstance(body[name], int) for name in (*FIGURES, "eval_duration"))
    parts = body["load_duration"] + body["prompt_eval_duration"] + body["eval_duration"]
    assert abs(parts - body["total_duration"]) <= 1_000
    assert body["eval_count"] == len(REPLY.split())
    (stats,) = seen
    assert (stats.endpoint, stats.error, stats.stream) == ("ollama.chat", "", False)


def test_chat_streams_json_lines_by_default(client: TestClient) -> None:
    response = client.post("/api/chat", json={"model": MODEL, "messages": QUESTION})
    assert response.headers["content-type"] == "application/x-ndjson"
    chunks = lines(response.text)
    assert "".join(chunk["message"]["content"] for chunk in chunks) == REPLY
    for chunk in chunks[:-1]:
        assert chunk["done"] is False
        assert set(chunk) == {"model", "created_at", "message", "done"}  # no figures until done
    final = chunks[-1]
    assert final["done"] is True and final["done_reason"] == "stop" and final["message"]["content"] == ""
    assert all(name in final for name in FIGURES)


def test_generate_both_ways(client: TestClient) -> None:
    plain = client.post("/api/generate", json={"model": MODEL, "prompt": "Hi", "stream": False}).json()
    assert plain["response"] == REPLY and "context" not in plain
    chunks = lines(client.post("/api/generate", json={"model": MODEL, "prompt": "Hi"}).text)
    assert "".join(chunk["response"] for chunk in chunks) == REPLY
    assert chunks[-1]["done_reason"] == "stop"


def test_an_empty_request_loads_the_model(client: TestClient) -> None:
    loaded = client.post("/api/generate", json={"model": f"{MODEL}:latest"}).json()
    assert loaded == {
        "model": MODEL,
        "created_at": loaded["created_at"],
        "response": "",
        "done": True,
        "done_reason": "load",
    }
    chat = client.post("/api/chat", json={"model": MODEL, "messages": []}).json()
    assert chat["done_reason"] == "load" and chat["message"] == {"role": "assistant", "content": ""}


def test_curl_style_form_encoding_is_read_as_json(client: TestClient) -> None:
    body = json.dumps({"model": MODEL, "prompt": "Hi", "stream": False})
    headers = {"content-type": "application/x-www-form-urlencoded"}
    response = client.post("/api/generate", content=body, headers=headers)
    assert response.status_code == 200 and response.json()["response"] == REPLY


def test_a_failure_mid_stream_is_an_error_line(seen: list[InferenceStats]) -> None:
    client = TestClient(create_app(models=ModelTable(FakeRuntime(fail_at=2)), observer=seen.append))
    chunks = lines(client.post("/api/chat", json={"model": MODEL, "messages": QUESTION}).text)
    assert chunks[-1]["error"] == "the fake model broke" and chunks[-1]["code"] == "generation_failed"
    assert all(chunk["done"] is False for chunk in chunks[:-1])
    assert seen[-1].error == "generation_failed"


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ({"options": {"no_such_option": 1}}, "unknown option 'no_such_option'"),
        ({"options": {"temperature": "hot"}}, "options.temperature"),
        ({"options": {"num_gpu": 1}}, "set by the fleet"),
        ({"format": "xml"}, "format must be 'json' or a JSON schema"),
        ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
        ({"think": True}, "thinking"),
        ({"logprobs": True}, "logprobs"),
        ({"messages": [{"role": "user", "content": "hi", "images": ["aGk="]}]}, "images"),
        ({"messages": [{"role": "tool", "content": "42"}]}, "messages.0.role"),
        ({"stream": "yes"}, "stream"),
    ],
)
def test_refusals_are_ollama_errors(
    client: TestClient, seen: list[InferenceStats], body: dict[str, Any], needle: str
) -> None:
    response = client.post("/api/chat", json={"model": MODEL, "messages": QUESTION, **body})
    assert response.status_code == 400
    error = response.json()
    assert set(error) <= {"error", "code"} and needle in error["error"]
    (stats,) = seen  # counted for its endpoint, like a malformed /v1 body
    assert stats.endpoint == "ollama.chat" and stats.error


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ({"suffix": "return x"}, "suffix"),
        ({"template": "{{ .Prompt }}"}, "template"),
        ({"context": [1, 2, 3]}, "context"),
        ({"raw": True, "system": "Be brief."}, "raw"),
        ({"images": ["aGk="]}, "images"),
    ],
)
def test_generate_refusals(client: TestClient, body: dict[str, Any], needle: str) -> None:
    response = client.post("/api/generate", json={"model": MODEL, "prompt": "Hi", **body})
    assert response.status_code == 400 and needle in response.json()["error"]


def test_num_ctx_over_the_window_is_refused(client: TestClient, seen: list[InferenceStats]) -> None:
    body = {"model": MODEL, "messages": QUESTION, "options": {"num_ctx": 4096}}
    response = client.post("/api/chat", json=body)
    assert response.status_code == 400
    assert response.json() == {"error": response.json()["error"], "code": "context_length_exceeded"}
    assert seen[-1].error == "context_length_exceeded"
    assert client.app.state.admission_queue.running == 0  # type: ignore[attr-defined]


def test_unknown_model_is_404(client: TestClient) -> None:
    for path, body in (
        ("/api/chat", {"messages": QUESTION}),
        ("/api/show", {}),
        ("/api/embed", {"input": "x"}),
    ):
        response = client.post(path, json={"model": "llama3.2", **body})
        assert response.status_code == 404, path
        assert "llama3.2" in response.json()["error"]


@pytest.mark.parametrize(("method", "path"), MANAGEMENT)
def test_model_management_is_refused(client: TestClient, method: str, path: str) -> None:
    response = client.request(method, path, json={"model": MODEL, "source": MODEL, "destination": "copy"})
    assert response.status_code == 403
    if method != "HEAD":
        assert response.json()["code"] == "managed_by_fleet" and "fleet" in response.json()["error"]


def test_embed_and_the_older_embeddings(client: TestClient, seen: list[InferenceStats]) -> None:
    body = client.post("/api/embed", json={"model": MODEL, "input": ["a", "b"]}).json()
    assert body["model"] == MODEL and len(body["embeddings"]) == 2
    assert {"total_duration", "load_duration", "prompt_eval_count"} <= set(body)
    single = client.post("/api/embeddings", json={"model": MODEL, "prompt": "a"}).json()
    assert single == {"embedding": body["embeddings"][0]}
    assert client.post("/api/embeddings", json={"model": MODEL, "prompt": ""}).json() == {"embedding": []}
    refused = client.post("/api/embed", json={"model": MODEL, "input": "a", "dimensions": 3})
    assert refused.status_code == 400 and "dimensions" in refused.json()["error"]
    assert [s.endpoint for s in seen] == ["ollama.embed", "ollama.embed", "ollama.embed"]


def test_listing(client: TestClient) -> None:
    (listed,) = client.get("/api/tags").json()["models"]
    assert listed["name"] == listed["model"] == MODEL and listed["details"]["format"] == "gguf"
    (running,) = client.get("/api/ps").json()["models"]
    assert running["context_length"] == 64 and running["expires_at"].endswith("Z")
    shown = client.post("/api/show", json={"model": MODEL}).json()
    assert shown["capabilities"] == ["completion", "embedding"]
    assert client.get("/api/version").json()["version"]


def test_api_key_applies_as_on_v1() -> None:
    app = create_app(models=ModelTable(FakeRuntime()), observer=lambda stats: None)
    require_api_key(app, "ef-secret")
    client = TestClient(app)
    refused = client.get("/api/tags")
    assert refused.status_code == 401 and refused.json()["code"] == "invalid_api_key"
    assert client.post("/api/chat", json={"bad": "body"}).status_code == 401  # before the body is judged
    keyed = client.get("/api/tags", headers={"Authorization": "Bearer ef-secret"})
    assert keyed.status_code == 200
    assert client.get("/healthz").status_code == 200


def test_metrics_label_the_ollama_paths(client: TestClient) -> None:
    client.post("/api/chat", json={"model": MODEL, "messages": QUESTION, "stream": False})
    metrics = client.get("/metrics").text
    assert 'edgefleet_api_completion_tokens_total{endpoint="/api/chat"}' in metrics
    assert 'endpoint="/api/chat",status="200"' in metrics


def test_openapi_documents_the_ollama_api(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    paths = spec["paths"]
    for path in ("/api/version", "/api/tags", "/api/ps"):
        assert "get" in paths[path]
    for path in ("/api/show", "/api/chat", "/api/generate", "/api/embed", "/api/embeddings", "/api/pull"):
        assert "post" in paths[path]
    chat = paths["/api/chat"]["post"]["responses"]
    assert "application/x-ndjson" in chat["200"]["content"]
    for status in ("400", "404", "429", "503"):
        assert chat[status]["content"]["application/json"]["schema"] == {
            "$ref": "#/components/schemas/OllamaError"
        }
    assert set(paths["/api/delete"]["delete"]["responses"]) == {"403", "401"}
    schemas = spec["components"]["schemas"]
    generate = schemas["OllamaGenerateRequest"]
    assert generate["properties"]["suffix"]["anyOf"] == [{"type": "string", "maxLength": 0}, {"type": "null"}]
    assert "not" in generate  # raw mode takes no system text
    assert schemas["OllamaOptions"]["additionalProperties"] is False


@pytest.mark.parametrize("value", ["json", {"type": "object", "properties": {"a": {"type": "integer"}}}])
def test_format_needs_a_runtime_that_constrains(
    client: TestClient, seen: list[InferenceStats], value: object
) -> None:
    """The fake runtime cannot constrain its decoding, so a format is refused, not ignored."""
    response = client.post("/api/chat", json={"model": MODEL, "messages": QUESTION, "format": value})
    assert response.status_code == 400
    assert response.json()["code"] == "constrained_decoding_not_supported"
    assert seen[-1].error == "constrained_decoding_not_supported"
    assert client.app.state.admission_queue.running == 0  # type: ignore[attr-defined]


def test_a_schema_the_engine_cannot_compile_is_refused_before_queueing(client: TestClient) -> None:
    body = {"model": MODEL, "prompt": "Hi", "format": {"type": "no-such-type"}}
    response = client.post("/api/generate", json=body)
    assert response.status_code == 400 and response.json()["code"] == "invalid_schema"
    assert "format" in response.json()["error"]
