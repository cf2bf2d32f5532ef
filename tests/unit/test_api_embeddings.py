"""POST /v1/embeddings and capability checks, against the scripted fake runtime."""

from __future__ import annotations

import base64
import struct
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient

from edgefleet.agent.api import create_app
from edgefleet.agent.runtimes.base import GENERATIVE, Capability
from edgefleet.agent.runtimes.model_table import ModelTable
from tests.unit.test_api import MODEL, FakeRuntime, Recorder, assert_openai_error, chat_body, completion_body


@pytest.fixture
def runtime() -> FakeRuntime:
    return FakeRuntime()


@pytest.fixture
def active(runtime: FakeRuntime) -> ModelTable:
    return ModelTable(runtime)


@pytest.fixture
def recorder() -> Recorder:
    return Recorder()


@pytest.fixture
def client(active: ModelTable, recorder: Recorder) -> Iterator[TestClient]:
    with TestClient(
        create_app(models=active, observer=recorder), raise_server_exceptions=False
    ) as test_client:
        yield test_client


def embedding_body(**overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"model": MODEL, "input": "hello there world"}
    body.update(overrides)
    return body


def test_single_string_gets_one_float_vector(client: TestClient, recorder: Recorder) -> None:
    response = client.post("/v1/embeddings", json=embedding_body())
    assert response.status_code == 200
    body = response.json()
    assert body["object"] == "list" and body["model"] == MODEL
    assert body["data"] == [{"object": "embedding", "index": 0, "embedding": [3.0, 17.0, 1.0]}]
    assert body["usage"] == {"prompt_tokens": 3, "total_tokens": 3}
    stats = recorder.only()
    assert stats.endpoint == "embeddings" and stats.error == "" and stats.prompt_tokens == 3


def test_list_input_keeps_order(client: TestClient, runtime: FakeRuntime) -> None:
    body = client.post("/v1/embeddings", json=embedding_body(input=["a", "b c", "d e f"])).json()
    assert [item["index"] for item in body["data"]] == [0, 1, 2]
    assert [item["embedding"][0] for item in body["data"]] == [1.0, 2.0, 3.0]
    assert body["usage"]["prompt_tokens"] == 6
    assert runtime.embedded == [["a", "b c", "d e f"]]


def test_base64_is_little_endian_float32(client: TestClient) -> None:
    body = client.post("/v1/embeddings", json=embedding_body(encoding_format="base64")).json()
    raw = base64.b64decode(body["data"][0]["embedding"])
    assert struct.unpack("<3f", raw) == (3.0, 17.0, 1.0)


def test_dimensions_equal_to_the_model_are_accepted(client: TestClient) -> None:
    assert client.post("/v1/embeddings", json=embedding_body(dimensions=3)).status_code == 200


def test_other_dimensions_are_refused(client: TestClient, recorder: Recorder) -> None:
    error = assert_openai_error(client.post("/v1/embeddings", json=embedding_body(dimensions=2)), 400)
    assert error["param"] == "dimensions" and "3" in error["message"]
    assert recorder.only().error == "invalid_value"


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        ([1, 2, 3], "token arrays"),
        ([[1, 2], [3]], "token arrays"),
        ([], "at least one"),
        ("", "empty"),
        (["ok", ""], "empty"),
        (5, None),
        (["a"] * 2049, "2048"),
    ],
    ids=["tokens", "token-lists", "empty-list", "empty-string", "empty-item", "number", "too-many"],
)
def test_bad_inputs_are_400(
    client: TestClient, runtime: FakeRuntime, value: object, fragment: str | None
) -> None:
    error = assert_openai_error(client.post("/v1/embeddings", json=embedding_body(input=value)), 400)
    assert error["param"] == "input"
    if fragment is not None:
        assert fragment in error["message"]
    assert runtime.embedded == []


def test_bad_encoding_format_is_400(client: TestClient) -> None:
    error = assert_openai_error(
        client.post("/v1/embeddings", json=embedding_body(encoding_format="hex")), 400
    )
    assert error["param"] == "encoding_format"


def test_unknown_model_is_404(client: TestClient) -> None:
    assert_openai_error(
        client.post("/v1/embeddings", json=embedding_body(model="other")), 404, "model_not_found"
    )


def test_model_without_embeddings_is_400_naming_it(client: TestClient, active: ModelTable) -> None:
    active.put(FakeRuntime(capabilities=GENERATIVE))
    error = assert_openai_error(
        client.post("/v1/embeddings", json=embedding_body()), 400, "capability_not_supported"
    )
    assert error["param"] == "model" and MODEL in error["message"] and "embeddings" in error["message"]
    assert active.in_flight(active.get(MODEL)) == 0  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("path", "body", "missing"),
    [
        ("/v1/chat/completions", chat_body(), "chat completions"),
        ("/v1/completions", completion_body(), "text completions"),
    ],
)
def test_encoder_refuses_generation(
    client: TestClient, active: ModelTable, recorder: Recorder, path: str, body: dict[str, Any], missing: str
) -> None:
    encoder = FakeRuntime(capabilities=frozenset({Capability.EMBEDDINGS}))
    active.put(encoder)
    error = assert_openai_error(client.post(path, json=body), 400, "capability_not_supported")
    assert missing in error["message"] and MODEL in error["message"]
    assert encoder.generations == []
    assert recorder.only().error == "capability_not_supported"
    assert client.post("/v1/embeddings", json=embedding_body()).status_code == 200


def test_no_model_is_503(client: TestClient, active: ModelTable) -> None:
    active.remove(MODEL)
    assert_openai_error(client.post("/v1/embeddings", json=embedding_body()), 503, "model_not_loaded")


def test_lease_and_slot_are_released(client: TestClient, runtime: FakeRuntime, active: ModelTable) -> None:
    client.post("/v1/embeddings", json=embedding_body())
    client.post("/v1/embeddings", json=embedding_body(dimensions=7))
    assert active.in_flight(runtime) == 0
    queue = client.app.state.admission_queue  # type: ignore[attr-defined]
    assert (queue.running, queue.waiting) == (0, 0)
