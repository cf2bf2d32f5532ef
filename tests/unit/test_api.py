"""The local OpenAI-compatible API against a scripted fake runtime (no model, no sockets).

The fake honours the Runtime contract (validation when a generation is opened, one delta
per token, stop sequences, token counts), so these tests pin the API's own behaviour:
shapes, SSE framing, every error path, observer calls, leases and cancellation.
"""

from __future__ import annotations

import asyncio
import json
import sys
import threading
import time
from collections.abc import Generator, Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from edgefleet.agent.api import create_app
from edgefleet.agent.runtimes.base import (
    GENERATIVE,
    Capability,
    CapabilityNotSupported,
    ChatMessage,
    ChatNotSupported,
    Completion,
    ContextLengthExceeded,
    Delta,
    Embeddings,
    FinishReason,
    GenerationError,
    RuntimeDescription,
    RuntimeUnloaded,
    SamplingParams,
    UnsupportedFormatError,
    collect,
)
from edgefleet.agent.runtimes.model_table import ModelNotServed, ModelTable, NoActiveModel
from edgefleet.agent.runtimes.text import StopTextBuffer
from edgefleet.agent.stats import InferenceStats
from edgefleet.protos.fleet.v1 import common_pb2

MODEL = "fake-model"
REPLY = "Paris is the capital of France ."


# --- the fake runtime --------------------------------------------------------------------


class FakeGeneration:
    def __init__(self, runtime: FakeRuntime, prompt_tokens: int, params: SamplingParams) -> None:
        self.runtime = runtime
        self.params = params
        self._prompt_tokens = prompt_tokens
        self.completion_tokens = 0
        self.closed = threading.Event()
        self._deltas = self._run()

    @property
    def prompt_tokens(self) -> int:
        return self._prompt_tokens

    def __iter__(self) -> Iterator[Delta]:
        return self

    def __next__(self) -> Delta:
        return next(self._deltas)

    def close(self) -> None:
        self._deltas.close()
        self.closed.set()

    def _run(self) -> Generator[Delta, None, None]:
        runtime = self.runtime
        try:
            if runtime.gate is not None:
                assert runtime.gate.wait(10), "test gate never opened"
            if runtime.unloaded:
                raise RuntimeUnloaded("fake was unloaded")
            words = runtime.reply.split()
            budget = min(len(words), runtime.n_ctx - self._prompt_tokens)
            if self.params.max_tokens is not None:
                budget = min(budget, self.params.max_tokens)
            text = StopTextBuffer(self.params.stop)
            finish: FinishReason = "stop" if budget == len(words) else "length"
            for index in range(budget):
                if runtime.fail_at == index:
                    raise GenerationError("the fake model broke")
                if runtime.token_delay:
                    time.sleep(runtime.token_delay)
                self.completion_tokens += 1
                piece = text.feed((words[index] if index == 0 else " " + words[index]).encode())
                if piece:
                    yield Delta(piece)
                if text.stopped:
                    finish = "stop"
                    break
            yield Delta(text.flush(), finish)
        finally:
            self.closed.set()


class FakeRuntime:
    """Implements edgefleet.agent.runtimes.base.Runtime with words as tokens."""

    def __init__(
        self,
        *,
        reply: str = REPLY,
        model_id: str = MODEL,
        n_ctx: int = 64,
        chat_supported: bool = True,
        fail_at: int | None = None,
        token_delay: float = 0.0,
        gate: threading.Event | None = None,
        capabilities: frozenset[Capability] = GENERATIVE | {Capability.EMBEDDINGS},
        dimensions: int = 3,
    ) -> None:
        self.capabilities = capabilities
        self.dimensions = dimensions
        self.embedded: list[list[str]] = []
        self.reply = reply
        self.model_id = model_id
        self.n_ctx = n_ctx
        self.chat_supported = chat_supported
        self.fail_at = fail_at
        self.token_delay = token_delay
        self.gate = gate
        self.unloaded = False
        self.generations: list[FakeGeneration] = []
        self.prompts: list[object] = []

    def describe(self) -> RuntimeDescription:
        return RuntimeDescription(
            runtime="fake",
            model_id=self.model_id,
            model_path=Path("/nonexistent/fake.gguf"),
            n_ctx=self.n_ctx,
            n_threads=1,
            gpu_offload=False,
            format=common_pb2.MODEL_FORMAT_GGUF,
            capabilities=self.capabilities,
        )

    def embed(self, texts: Sequence[str]) -> Embeddings:
        """Vector i of a text is (words, characters, i+1, ...): easy to check, dimension-sized."""
        if Capability.EMBEDDINGS not in self.capabilities:
            raise CapabilityNotSupported(self.model_id, Capability.EMBEDDINGS)
        if self.gate is not None:
            assert self.gate.wait(10), "test gate never opened"
        self.embedded.append(list(texts))
        vectors = tuple(
            tuple(
                [
                    float(len(text.split())),
                    float(len(text)),
                    *(float(i + 1) for i in range(self.dimensions - 2)),
                ]
            )
            for text in texts
        )
        return Embeddings(vectors=vectors, prompt_tokens=sum(len(text.split()) for text in texts))

    def chat(self, messages: Sequence[ChatMessage], params: SamplingParams) -> Completion:
        return collect(self.chat_stream(messages, params))

    def complete(self, prompt: str, params: SamplingParams) -> Completion:
        return collect(self.complete_stream(prompt, params))

    def chat_stream(self, messages: Sequence[ChatMessage], params: SamplingParams) -> FakeGeneration:
        if not self.chat_supported:
            raise ChatNotSupported("fake base model has no chat template")
        self.prompts.append(list(messages))
        return self._open(sum(len(m.content.split()) + 2 for m in messages), params)

    def complete_stream(self, prompt: str, params: SamplingParams) -> FakeGeneration:
        self.prompts.append(prompt)
        return self._open(len(prompt.split()), params)

    def smoke_test(self) -> None:
        self.complete("hi", SamplingParams(max_tokens=1))

    def unload(self) -> None:
        self.unloaded = True

    def _open(self, prompt_tokens: int, params: SamplingParams) -> FakeGeneration:
        if self.unloaded:
            raise RuntimeUnloaded("fake was unloaded")
        if prompt_tokens >= self.n_ctx:
            raise ContextLengthExceeded(prompt_tokens=prompt_tokens, n_ctx=self.n_ctx)
        generation = FakeGeneration(self, prompt_tokens, params)
        self.generations.append(generation)
        return generation


# --- fixtures ----------------------------------------------------------------------------


class Recorder:
    def __init__(self) -> None:
        self.stats: list[InferenceStats] = []

    def __call__(self, stats: InferenceStats) -> None:
        self.stats.append(stats)

    def only(self) -> InferenceStats:
        assert len(self.stats) == 1, self.stats
        return self.stats[0]


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
def app(active: ModelTable, recorder: Recorder) -> FastAPI:
    return create_app(models=active, observer=recorder, health=lambda: {"state": "active", "slot": "b"})


@pytest.fixture
def client(app: FastAPI) -> Iterator[TestClient]:
    with TestClient(app, raise_server_exceptions=False) as test_client:
        yield test_client


def chat_body(**overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"model": MODEL, "messages": [{"role": "user", "content": "What is the capital?"}]}
    body.update(overrides)
    return body


def completion_body(**overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"model": MODEL, "prompt": "The capital of France is"}
    body.update(overrides)
    return body


def sse_events(raw: str) -> list[str]:
    """Split an SSE body into data payloads, checking the framing on the way."""
    assert raw.endswith("\n\n")
    blocks = raw.split("\n\n")[:-1]
    payloads = []
    for block in blocks:
        assert block.startswith("data: "), block
        assert "\n" not in block, block
        payloads.append(block.removeprefix("data: "))
    return payloads


def stream(client: TestClient, path: str, body: dict[str, Any]) -> tuple[httpx.Response, list[str]]:
    with client.stream("POST", path, json=body) as response:
        raw = response.read().decode()
    return response, sse_events(raw) if response.status_code == 200 else [raw]


def assert_openai_error(response: httpx.Response, status: int, code: str | None = None) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}
    error: dict[str, Any] = body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    assert isinstance(error["type"], str) and error["type"]
    if code is not None:
        assert error["code"] == code
    return error


# --- models and health -------------------------------------------------------------------


def test_models_lists_the_active_model(client: TestClient) -> None:
    response = client.get("/v1/models")
    assert response.status_code == 200
    body = response.json()
    assert body["object"] == "list"
    assert [card["id"] for card in body["data"]] == [MODEL]
    card = body["data"][0]
    assert card["object"] == "model" and isinstance(card["created"], int) and card["owned_by"]


def test_models_is_empty_without_a_model(client: TestClient, active: ModelTable) -> None:
    active.remove(MODEL)
    assert client.get("/v1/models").json() == {"object": "list", "data": []}


def test_healthz_ok_merges_agent_health(client: TestClient) -> None:
    response = client.get("/healthz")
    assert response.status_code == 200
    assert response.json() == {
        "state": "active",
        "slot": "b",
        "status": "ok",
        "model": MODEL,
        "runtime": "fake",
        "models": [{"id": MODEL, "runtime": "fake"}],
    }


def test_healthz_503_without_a_model(client: TestClient, active: ModelTable) -> None:
    active.remove(MODEL)
    response = client.get("/healthz")
    assert response.status_code == 503
    assert response.json()["status"] == "unavailable"
    assert response.json()["model"] is None


def test_healthz_without_probe(recorder: Recorder) -> None:
    app = create_app(models=ModelTable(FakeRuntime()), observer=recorder)
    with TestClient(app) as client:
        assert client.get("/healthz").json() == {
            "status": "ok",
            "model": MODEL,
            "runtime": "fake",
            "models": [{"id": MODEL, "runtime": "fake"}],
        }


def test_requests_name_the_model_that_answers(client: TestClient, active: ModelTable) -> None:
    """A device holding several models: /v1/models lists each, the `model` field routes."""
    other = FakeRuntime(model_id="other-model")
    active.put(other)
    assert [card["id"] for card in client.get("/v1/models").json()["data"]] == [MODEL, "other-model"]
    for name in (MODEL, "other-model"):
        response = client.post("/v1/completions", json={**completion_body(), "model": name})
        assert response.status_code == 200 and response.json()["model"] == name
    assert other.prompts, "the second model never answered"
    health = client.get("/healthz").json()
    assert [m["id"] for m in health["models"]] == [MODEL, "other-model"]


# --- happy paths -------------------------------------------------------------------------


def test_chat_completion(client: TestClient, recorder: Recorder) -> None:
    response = client.post("/v1/chat/completions", json=chat_body())
    assert response.status_code == 200
    body = response.json()
    assert body["object"] == "chat.completion"
    assert body["id"].startswith("chatcmpl-")
    assert body["model"] == MODEL
    assert isinstance(body["created"], int)
    (choice,) = body["choices"]
    assert choice["index"] == 0
    assert choice["message"] == {"role": "assistant", "content": REPLY}
    assert choice["finish_reason"] == "stop"
    words = len(REPLY.split())
    assert body["usage"] == {"prompt_tokens": 6, "completion_tokens": words, "total_tokens": 6 + words}
    stats = recorder.only()
    assert stats.endpoint == "chat.completions"
    assert stats.model == MODEL
    assert (stats.prompt_tokens, stats.completion_tokens) == (6, words)
    assert stats.stream is False
    assert stats.error == ""
    assert stats.latency_ms >= stats.time_to_first_token_ms > 0
    assert stats.tokens_per_second > 0


def test_chat_content_parts_and_developer_role(client: TestClient, runtime: FakeRuntime) -> None:
    messages = [
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Hello "}, {"type": "text", "text": "there"}]},
    ]
    assert client.post("/v1/chat/completions", json=chat_body(messages=messages)).status_code == 200
    assert runtime.prompts[-1] == [
        ChatMessage(role="system", content="Be brief."),
        ChatMessage(role="user", content="Hello there"),
    ]


def test_text_completion(client: TestClient, recorder: Recorder) -> None:
    response = client.post("/v1/completions", json=completion_body(max_tokens=50))
    assert response.status_code == 200
    body = response.json()
    assert body["object"] == "text_completion"
    assert body["id"].startswith("cmpl-")
    assert body["choices"] == [{"index": 0, "text": REPLY, "finish_reason": "stop", "logprobs": None}]
    assert body["usage"]["prompt_tokens"] == 5
    assert recorder.only().endpoint == "completions"


def test_completion_defaults_to_sixteen_tokens(client: TestClient, runtime: FakeRuntime) -> None:
    client.post("/v1/completions", json=completion_body())
    assert runtime.generations[-1].params.max_tokens == 16


def test_completion_accepts_a_one_prompt_list(client: TestClient, runtime: FakeRuntime) -> None:
    assert client.post("/v1/completions", json=completion_body(prompt=["Hi there"])).status_code == 200
    assert runtime.prompts[-1] == "Hi there"


def test_max_tokens_truncates_with_length(client: TestClient) -> None:
    body = client.post("/v1/chat/completions", json=chat_body(max_tokens=2)).json()
    assert body["choices"][0]["message"]["content"] == "Paris is"
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == 2


def test_max_completion_tokens_wins_over_max_tokens(client: TestClient, runtime: FakeRuntime) -> None:
    client.post("/v1/chat/completions", json=chat_body(max_tokens=5, max_completion_tokens=3))
    assert runtime.generations[-1].params.max_tokens == 3


@pytest.mark.parametrize("stop", [" capital", [" nothing", " capital"]])
def test_stop_sequences(client: TestClient, stop: str | list[str]) -> None:
    body = client.post("/v1/completions", json=completion_body(stop=stop, max_tokens=50)).json()
    assert body["choices"][0]["text"] == "Paris is the"
    assert body["choices"][0]["finish_reason"] == "stop"


def test_sampling_params_reach_the_runtime(client: TestClient, runtime: FakeRuntime) -> None:
    client.post(
        "/v1/chat/completions",
        json=chat_body(
            temperature=0,
            top_p=0.5,
            seed=7,
            stop="x",
            frequency_penalty=0.5,
            presence_penalty=-0.5,
            max_tokens=4,
            user="someone",
            unknown_future_option={"a": 1},
        ),
    )
    assert runtime.generations[-1].params == SamplingParams(
        max_tokens=4,
        temperature=0.0,
        top_p=0.5,
        seed=7,
        stop=("x",),
        frequency_penalty=0.5,
        presence_penalty=-0.5,
    )


def test_openai_defaults_for_omitted_sampling(client: TestClient, runtime: FakeRuntime) -> None:
    client.post("/v1/chat/completions", json=chat_body())
    assert runtime.generations[-1].params == SamplingParams()


# --- streaming -----------------------------------------------------------------------------


def test_chat_stream_format(client: TestClient, recorder: Recorder) -> None:
    response, events = stream(client, "/v1/chat/completions", chat_body(stream=True))
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    assert events[-1] == "[DONE]"
    chunks = [json.loads(event) for event in events[:-1]]
    assert len({chunk["id"] for chunk in chunks}) == 1
    assert all(chunk["object"] == "chat.completion.chunk" for chunk in chunks)
    assert all("usage" not in chunk for chunk in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    content = "".join(chunk["choices"][0]["delta"].get("content", "") for chunk in chunks)
    assert content == REPLY
    assert [chunk["choices"][0]["finish_reason"] for chunk in chunks][-1] == "stop"
    assert chunks[-1]["choices"][0]["delta"] == {}
    assert all(chunk["choices"][0]["finish_reason"] is None for chunk in chunks[:-1])
    stats = recorder.only()
    assert stats.stream is True and stats.error == ""
    assert stats.completion_tokens == len(REPLY.split())


def test_chat_stream_include_usage(client: TestClient) -> None:
    body = chat_body(stream=True, stream_options={"include_usage": True}, max_tokens=3)
    _, events = stream(client, "/v1/chat/completions", body)
    chunks = [json.loads(event) for event in events[:-1]]
    assert all(chunk["usage"] is None for chunk in chunks[:-1])
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"] == {"prompt_tokens": 6, "completion_tokens": 3, "total_tokens": 9}
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"


def test_completion_stream(client: TestClient) -> None:
    body = completion_body(stream=True, max_tokens=50, stream_options={"include_usage": True})
    _, events = stream(client, "/v1/completions", body)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(event) for event in events[:-1]]
    assert all(chunk["object"] == "text_completion" for chunk in chunks)
    text = "".join(choice["text"] for chunk in chunks for choice in chunk["choices"])
    assert text == REPLY
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
    assert chunks[-1]["usage"]["completion_tokens"] == len(REPLY.split())


def test_stream_holds_back_stop_sequences(client: TestClient) -> None:
    _, events = stream(client, "/v1/completions", completion_body(stream=True, stop=" capital of"))
    chunks = [json.loads(event) for event in events[:-1]]
    assert "".join(chunk["choices"][0]["text"] for chunk in chunks) == "Paris is the"


def test_mid_stream_failure_is_reported_in_band(client: TestClient, recorder: Recorder) -> None:
    client.app.state.models.put(FakeRuntime(fail_at=2))  # type: ignore[attr-defined]
    response, events = stream(client, "/v1/chat/completions", chat_body(stream=True))
    assert response.status_code == 200
    assert events[-1] == "[DONE]"
    error = json.loads(events[-2])
    assert error["error"]["code"] == "generation_failed"
    assert error["error"]["type"] == "server_error"
    assert recorder.only().error == "generation_failed"


# --- errors --------------------------------------------------------------------------------

BAD_BODIES: list[tuple[str, str, dict[str, Any] | bytes, str | None]] = [
    ("chat", "malformed json", b'{"model": "fake-model", "messages": [', "invalid_json"),
    ("chat", "json array", b"[1, 2]", None),
    ("chat", "json string", b'"hello"', None),
    ("chat", "missing messages", {"model": MODEL}, "missing"),
    ("chat", "missing model", {"messages": [{"role": "user", "content": "hi"}]}, "missing"),
    ("chat", "empty messages", chat_body(messages=[]), None),
    ("chat", "bad role", chat_body(messages=[{"role": "robot", "content": "hi"}]), None),
    ("chat", "content number", chat_body(messages=[{"role": "user", "content": 5}]), None),
    ("chat", "max_tokens string", chat_body(max_tokens="5"), None),
    ("chat", "max_tokens negative", chat_body(max_tokens=-1), None),
    ("chat", "max_tokens zero", chat_body(max_tokens=0), None),
    ("chat", "max_completion_tokens negative", chat_body(max_completion_tokens=-3), None),
    ("chat", "max_tokens float", chat_body(max_tokens=1.5), None),
    ("chat", "temperature too high", chat_body(temperature=3), None),
    ("chat", "top_p too high", chat_body(top_p=1.5), None),
    ("chat", "n=9", chat_body(n=9), None),
    ("chat", "stream not bool", chat_body(stream="yes"), None),
    ("chat", "seed string", chat_body(seed="7"), None),
    ("chat", "too many stops", chat_body(stop=["a", "b", "c", "d", "e"]), None),
    ("chat", "stop number", chat_body(stop=5), None),
    ("completions", "missing prompt", {"model": MODEL}, "missing"),
    ("completions", "two prompts", completion_body(prompt=["a", "b"]), None),
    ("completions", "token prompt", completion_body(prompt=[1, 2, 3]), None),
    ("completions", "echo with logprobs", completion_body(echo=True, logprobs=1), None),
    ("completions", "logprobs", completion_body(logprobs=2), None),
    ("completions", "suffix", completion_body(suffix="end"), None),
    ("completions", "negative max_tokens", completion_body(max_tokens=-5), None),
    ("completions", "n=0", completion_body(n=0), None),
]


@pytest.mark.parametrize(
    ("endpoint", "body", "code"),
    [(endpoint, body, code) for endpoint, _, body, code in BAD_BODIES],
    ids=[f"{endpoint}-{name}" for endpoint, name, _, _ in BAD_BODIES],
)
def test_invalid_requests_get_openai_400(
    client: TestClient,
    recorder: Recorder,
    runtime: FakeRuntime,
    endpoint: str,
    body: dict[str, Any] | bytes,
    code: str | None,
) -> None:
    path = "/v1/chat/completions" if endpoint == "chat" else "/v1/completions"
    if isinstance(body, bytes):
        response = client.post(path, content=body, headers={"content-type": "application/json"})
    else:
        response = client.post(path, json=body)
    error = assert_openai_error(response, 400, code)
    assert error["type"] == "invalid_request_error"
    assert runtime.generations == []
    stats = recorder.only()
    assert stats.error and stats.endpoint == ("chat.completions" if endpoint == "chat" else "completions")


def test_invalid_field_names_the_param(client: TestClient) -> None:
    error = assert_openai_error(client.post("/v1/chat/completions", json=chat_body(max_tokens=-1)), 400)
    assert error["param"] == "max_tokens"
    error = assert_openai_error(client.post("/v1/chat/completions", json=chat_body(n=9)), 400)
    assert error["param"] == "n"
    assert "8" in error["message"]


def test_body_without_json_content_type(client: TestClient) -> None:
    response = client.post("/v1/chat/completions", content=json.dumps(chat_body()).encode())
    error = assert_openai_error(response, 400)
    assert "application/json" in error["message"]


@pytest.mark.parametrize("streamed", [False, True])
@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
def test_unknown_model_is_404(client: TestClient, recorder: Recorder, path: str, streamed: bool) -> None:
    body = chat_body(model="gpt-4o") if "chat" in path else completion_body(model="gpt-4o")
    response = client.post(path, json={**body, "stream": streamed})
    error = assert_openai_error(response, 404, "model_not_found")
    assert error["param"] == "model"
    assert recorder.only().error == "model_not_found"


@pytest.mark.parametrize("streamed", [False, True])
@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
def test_no_model_is_503(
    client: TestClient, active: ModelTable, recorder: Recorder, path: str, streamed: bool
) -> None:
    active.remove(MODEL)
    body = chat_body() if "chat" in path else completion_body()
    response = client.post(path, json={**body, "stream": streamed})
    error = assert_openai_error(response, 503, "model_not_loaded")
    assert error["type"] == "service_unavailable_error"
    assert recorder.only().error == "model_not_loaded"


@pytest.mark.parametrize("streamed", [False, True])
def test_context_length_exceeded_is_400(client: TestClient, recorder: Recorder, streamed: bool) -> None:
    body = completion_body(prompt="word " * 100, stream=streamed)
    error = assert_openai_error(client.post("/v1/completions", json=body), 400, "context_length_exceeded")
    assert error["type"] == "invalid_request_error"
    assert error["param"] == "prompt"
    stats = recorder.only()
    assert stats.error == "context_length_exceeded"
    assert stats.prompt_tokens == 100


def test_context_length_exceeded_in_chat_points_at_messages(client: TestClient) -> None:
    body = chat_body(messages=[{"role": "user", "content": "word " * 100}])
    error = assert_openai_error(
        client.post("/v1/chat/completions", json=body), 400, "context_length_exceeded"
    )
    assert error["param"] == "messages"


def test_chat_on_a_base_model_is_400(client: TestClient, active: ModelTable) -> None:
    active.put(FakeRuntime(chat_supported=False))
    assert_openai_error(client.post("/v1/chat/completions", json=chat_body()), 400, "chat_not_supported")
    assert client.post("/v1/completions", json=completion_body()).status_code == 200


@pytest.mark.parametrize("streamed", [False, True])
def test_generation_failure_before_first_token_is_500(
    client: TestClient, active: ModelTable, recorder: Recorder, streamed: bool
) -> None:
    active.put(FakeRuntime(fail_at=0))
    response = client.post("/v1/chat/completions", json=chat_body(stream=streamed))
    error = assert_openai_error(response, 500, "generation_failed")
    assert error["type"] == "server_error"
    assert recorder.only().error == "generation_failed"


def test_unloaded_runtime_is_503(client: TestClient, runtime: FakeRuntime) -> None:
    runtime.unload()
    assert_openai_error(client.post("/v1/chat/completions", json=chat_body()), 503, "model_unloaded")


def test_unknown_route_and_wrong_method(client: TestClient) -> None:
    error = assert_openai_error(client.get("/v1/nothing"), 404)
    assert error["type"] == "not_found_error"
    assert_openai_error(client.get("/v1/chat/completions"), 405)


def test_unexpected_exception_is_openai_500(client: TestClient, active: ModelTable) -> None:
    class Broken(FakeRuntime):
        def chat_stream(self, messages: Sequence[ChatMessage], params: SamplingParams) -> FakeGeneration:
            raise KeyError("bug")

    active.put(Broken())
    assert_openai_error(client.post("/v1/chat/completions", json=chat_body()), 500, "internal_error")


def test_observer_failure_does_not_break_serving(active: ModelTable) -> None:
    def broken_observer(stats: InferenceStats) -> None:
        raise RuntimeError("telemetry down")

    with TestClient(create_app(models=active, observer=broken_observer)) as client:
        assert client.post("/v1/chat/completions", json=chat_body()).status_code == 200


# --- concurrency, leases, cancellation ------------------------------------------------------


async def test_generation_does_not_block_the_event_loop(active: ModelTable, recorder: Recorder) -> None:
    gate = threading.Event()
    active.put(FakeRuntime(gate=gate))
    app = create_app(models=active, observer=recorder)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://device") as client:
        pending = asyncio.create_task(client.post("/v1/chat/completions", json=chat_body()))
        await asyncio.sleep(0.05)
        health = await asyncio.wait_for(client.get("/healthz"), timeout=5)
        assert health.status_code == 200
        assert not pending.done()
        gate.set()
        response = await asyncio.wait_for(pending, timeout=5)
    assert response.status_code == 200


def test_leases_are_released_after_every_request(client: TestClient, runtime: FakeRuntime) -> None:
    active = client.app.state.models  # type: ignore[attr-defined]
    client.post("/v1/chat/completions", json=chat_body())
    stream(client, "/v1/chat/completions", chat_body(stream=True))
    client.post("/v1/completions", json=completion_body(prompt="word " * 100))
    client.post("/v1/chat/completions", json=chat_body(model="other"))
    deadline = time.monotonic() + 5
    while active.in_flight(runtime) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert active.in_flight(runtime) == 0
    assert all(generation.closed.is_set() for generation in runtime.generations)


async def test_client_disconnect_stops_generation(active: ModelTable, recorder: Recorder) -> None:
    reply = " ".join(f"w{i}" for i in range(500))
    runtime = FakeRuntime(reply=reply, n_ctx=10_000, token_delay=0.005)
    active.put(runtime)
    app = create_app(models=active, observer=recorder)
    body = json.dumps(chat_body(stream=True, max_tokens=500)).encode()
    disconnected = asyncio.Event()
    request_sent = False
    body_chunks = 0

    async def receive() -> dict[str, Any]:
        nonlocal request_sent
        if not request_sent:
            request_sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        await disconnected.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        nonlocal body_chunks
        if message["type"] == "http.response.body" and message.get("body"):
            body_chunks += 1
            if body_chunks == 3:
                disconnected.set()

    scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.4"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/v1/chat/completions",
        "raw_path": b"/v1/chat/completions",
        "query_string": b"",
        "root_path": "",
        "headers": [(b"content-type", b"application/json"), (b"host", b"device")],
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 8000),
    }
    await asyncio.wait_for(app(scope, receive, send), timeout=10)  # type: ignore[arg-type]
    generation = runtime.generations[-1]
    assert await asyncio.to_thread(generation.closed.wait, 5)
    assert generation.completion_tokens < 100, "generation kept running after the client left"
    assert await asyncio.to_thread(active.wait_idle, runtime, timeout=5)
    assert recorder.only().error == "client_disconnected"


# --- ModelTable -----------------------------------------------------------------------------


def test_model_table_put_replaces_by_name_and_returns_the_old_runtime() -> None:
    first, second, other = FakeRuntime(), FakeRuntime(), FakeRuntime(model_id="other")
    table = ModelTable()
    assert table.names() == [] and table.get(MODEL) is None
    assert table.put(first) is None
    assert table.put(other) is None
    assert table.put(second) is first  # same name: replaced
    assert table.names() == ["fake-model", "other"]
    assert table.runtimes() == [second, other]
    assert table.remove("other") is other and table.remove("other") is None
    assert table.names() == [MODEL]


def test_lease_without_model_raises() -> None:
    with pytest.raises(NoActiveModel):
        ModelTable().lease(MODEL)


def test_lease_of_a_model_not_held_names_the_models_that_are() -> None:
    table = ModelTable(FakeRuntime(), FakeRuntime(model_id="embedder"))
    with pytest.raises(ModelNotServed, match=r"`nope`.*`embedder`, `fake-model`"):
        table.lease("nope")
    with table.lease("embedder") as runtime:
        assert runtime.describe().model_id == "embedder"


def test_retire_waits_for_in_flight_leases() -> None:
    old, new = FakeRuntime(), FakeRuntime()
    active = ModelTable(old)
    lease = active.lease(MODEL)
    assert active.in_flight(old) == 1
    assert active.put(new) is old
    with active.lease(MODEL) as runtime:
        assert runtime is new  # new requests already go to the new model
    retired = threading.Thread(target=active.retire, args=(old,))
    retired.start()
    time.sleep(0.1)
    assert not old.unloaded, "unloaded under an in-flight request"
    lease.release()
    lease.release()  # idempotent
    retired.join(5)
    assert old.unloaded
    assert active.in_flight(old) == 0


def test_retire_times_out_but_unloads() -> None:
    old = FakeRuntime()
    active = ModelTable(old)
    active.lease(MODEL)
    active.remove(MODEL)
    assert active.retire(old, timeout=0.05) is False
    assert old.unloaded


def test_retire_refuses_a_runtime_still_serving() -> None:
    runtime = FakeRuntime()
    with pytest.raises(ValueError, match="still serves"):
        ModelTable(runtime).retire(runtime)


# --- runtime plumbing the API relies on ----------------------------------------------------


def test_stop_buffer_holds_back_partial_stops() -> None:
    buffer = StopTextBuffer(["END"])
    assert buffer.feed(b"abc E") == "abc "
    assert buffer.feed(b"N") == ""
    assert buffer.feed(b"x") == "ENx"
    assert buffer.feed(b" EN") == " "
    assert buffer.feed(b"D tail") == ""
    assert buffer.stopped
    assert buffer.flush() == ""


def test_stop_buffer_flushes_held_text_at_the_end() -> None:
    buffer = StopTextBuffer(["END"])
    assert buffer.feed(b"abc EN") == "abc "
    assert buffer.flush() == "EN"


def test_stop_buffer_joins_split_utf8() -> None:
    buffer = StopTextBuffer([])
    data = "é€".encode()
    assert buffer.feed(data[:1]) == ""
    assert buffer.feed(data[1:3]) == "é"
    assert buffer.feed(data[3:]) == "€"


def test_stop_buffer_earliest_stop_wins() -> None:
    buffer = StopTextBuffer(["c", "ab"])
    assert buffer.feed(b"xxabc") == "xx"


def test_importing_runtimes_does_not_import_llama_cpp() -> None:
    code = "import sys, edgefleet.agent.runtimes, edgefleet.agent.api; assert 'llama_cpp' not in sys.modules"
    import subprocess

    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("fmt", [common_pb2.MODEL_FORMAT_UNSPECIFIED, 99])
def test_registry_refuses_unknown_formats(fmt: int, tmp_path: Path) -> None:
    from edgefleet.agent.runtimes import load_runtime

    with pytest.raises(UnsupportedFormatError) as raised:
        load_runtime(fmt=fmt, model_path=tmp_path / "m", model_id="m")
    assert raised.value.fmt == fmt
    expected = common_pb2.ModelFormat.Name(fmt) if fmt != 99 else "#99"  # type: ignore[arg-type]
    assert expected in str(raised.value)


def test_registry_refuses_a_format_whose_backend_is_not_installed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from edgefleet.agent.runtimes import load_runtime, registry

    monkeypatch.setattr(registry.importlib.util, "find_spec", lambda name: None)
    assert registry.supported_formats() == frozenset()
    with pytest.raises(UnsupportedFormatError):
        load_runtime(fmt=common_pb2.MODEL_FORMAT_GGUF, model_path=tmp_path / "m", model_id="m")
