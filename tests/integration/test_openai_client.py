"""The official `openai` client against the device API on a real uvicorn, serving real SmolLM2."""

from __future__ import annotations

import asyncio
import math
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
from fastapi import FastAPI

from edgefleet.agent.api import create_app
from edgefleet.agent.api.admission import AdmissionQueue, QueueLimits
from edgefleet.agent.runtimes.base import Capability, Runtime
from edgefleet.agent.runtimes.model_table import ModelTable
from tests.integration.api_server import MODEL_ID, Recorder, loaded_smollm2, serving

pytestmark = pytest.mark.integration

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


class Device:
    """A running API: base URL, the model holder, the app and what the observer saw."""

    def __init__(
        self, base_url: str, active: ModelTable, runtime: Runtime, recorder: Recorder, app: FastAPI
    ) -> None:
        self.base_url = base_url
        self.active = active
        self.runtime = runtime
        self.recorder = recorder
        self.queue: AdmissionQueue = app.state.admission_queue

    def wait_idle(self) -> None:
        """Until no request holds the model or a queue slot."""
        deadline = time.monotonic() + 10
        while (self.active.in_flight(self.runtime) or self.queue.running) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert self.active.in_flight(self.runtime) == 0 and self.queue.running == 0


@pytest.fixture(scope="module")
def runtime() -> Iterator[Runtime]:
    with loaded_smollm2(n_ctx=1024) as loaded:
        yield loaded


@pytest.fixture(scope="module")
def device(runtime: Runtime) -> Iterator[Device]:
    active = ModelTable(runtime)
    recorder = Recorder()
    app = create_app(models=active, observer=recorder, health=lambda: {"state": "active"})
    with serving(app) as base_url:
        yield Device(base_url, active, runtime, recorder, app)


@pytest.fixture
def client(device: Device) -> openai.OpenAI:
    device.recorder.clear()
    return openai.OpenAI(base_url=f"{device.base_url}/v1", api_key="not-needed", max_retries=0, timeout=120)


def test_models_list(client: openai.OpenAI) -> None:
    models = client.models.list()
    assert [model.id for model in models.data] == [MODEL_ID]


def test_chat_completion(client: openai.OpenAI, device: Device) -> None:
    response = client.chat.completions.create(
        model=MODEL_ID,
        messages=QUESTION,
        max_tokens=16,
        temperature=0,
        seed=1,  # type: ignore[arg-type]
    )
    choice = response.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content and choice.message.content.strip()
    assert choice.finish_reason in ("stop", "length")
    assert response.usage is not None
    assert 0 < response.usage.completion_tokens <= 16
    assert response.usage.total_tokens == response.usage.prompt_tokens + response.usage.completion_tokens
    (stats,) = device.recorder.wait_for(1)
    assert stats.endpoint == "chat.completions" and not stats.stream and stats.error == ""
    assert stats.completion_tokens == response.usage.completion_tokens
    assert stats.prompt_tokens == response.usage.prompt_tokens
    assert stats.tokens_per_second > 0
    assert 0 < stats.time_to_first_token_ms <= stats.latency_ms


def test_chat_stream_with_usage_matches_plain(client: openai.OpenAI, device: Device) -> None:
    kwargs: dict[str, Any] = {"model": MODEL_ID, "messages": QUESTION, "max_tokens": 16, "temperature": 0}
    plain = client.chat.completions.create(**kwargs)
    chunks = list(
        client.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True})
    )
    content = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    assert content == plain.choices[0].message.content
    finishes = [chunk.choices[0].finish_reason for chunk in chunks if chunk.choices]
    assert finishes[-1] == plain.choices[0].finish_reason
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None and plain.usage is not None
    assert chunks[-1].usage.completion_tokens == plain.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == plain.usage.prompt_tokens
    streamed = device.recorder.wait_for(2)[1]
    assert streamed.stream and streamed.error == ""
    assert streamed.completion_tokens == plain.usage.completion_tokens


def test_completion(client: openai.OpenAI) -> None:
    response = client.completions.create(
        model=MODEL_ID, prompt="The capital of France is", max_tokens=8, temperature=0
    )
    assert "Paris" in response.choices[0].text
    assert response.usage is not None and 0 < response.usage.completion_tokens <= 8


def test_completion_stream_with_usage(client: openai.OpenAI) -> None:
    chunks = list(
        client.completions.create(
            model=MODEL_ID,
            prompt="The capital of France is",
            max_tokens=6,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert all(chunk.usage is None for chunk in chunks[:-1])
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None
    assert 0 < chunks[-1].usage.completion_tokens <= 6
    assert (
        chunks[-1].usage.total_tokens == chunks[-1].usage.prompt_tokens + chunks[-1].usage.completion_tokens
    )
    assert chunks[-2].choices[0].finish_reason in ("stop", "length")


def embeddings_supported(runtime: Runtime) -> bool:
    return Capability.EMBEDDINGS in runtime.describe().capabilities


def cosine(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b, strict=True))
    return dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))


def test_embeddings(client: openai.OpenAI, device: Device) -> None:
    if not embeddings_supported(device.runtime):
        pytest.fail("the llama.cpp runtime does not declare EMBEDDINGS yet")
    texts = ["The cat sat on the mat.", "A cat is sitting on a mat.", "Quarterly revenue rose by 4%."]
    as_floats = client.embeddings.create(model=MODEL_ID, input=texts, encoding_format="float")
    as_base64 = client.embeddings.create(model=MODEL_ID, input=texts)  # the SDK asks for base64
    assert [item.index for item in as_floats.data] == [0, 1, 2]
    vectors = [item.embedding for item in as_floats.data]
    size = len(vectors[0])
    assert size > 0 and all(len(vector) == size for vector in vectors)
    for decoded, plain in zip(as_base64.data, vectors, strict=True):
        assert decoded.embedding == pytest.approx(plain, rel=1e-6, abs=1e-6)
    assert cosine(vectors[0], vectors[1]) > cosine(vectors[0], vectors[2])
    assert as_floats.usage.prompt_tokens > 0
    assert as_floats.usage.total_tokens == as_floats.usage.prompt_tokens
    single = client.embeddings.create(model=MODEL_ID, input=texts[0], dimensions=size)
    assert len(single.data) == 1
    with pytest.raises(openai.BadRequestError) as raised:
        client.embeddings.create(model=MODEL_ID, input=texts[0], dimensions=size // 2)
    assert raised.value.param == "dimensions"
    with pytest.raises(openai.BadRequestError, match="token arrays"):
        client.embeddings.create(model=MODEL_ID, input=[[1, 2, 3]])
    stats = device.recorder.wait_for(3)
    assert [s.endpoint for s in stats[:3]] == ["embeddings"] * 3
    assert stats[0].prompt_tokens == as_floats.usage.prompt_tokens


def test_completion_stream_and_stop(client: openai.OpenAI) -> None:
    stream = client.completions.create(
        model=MODEL_ID,
        prompt="The capital of France is",
        max_tokens=16,
        temperature=0,
        stop=["."],
        stream=True,
    )
    chunks = list(stream)
    text = "".join(chunk.choices[0].text for chunk in chunks if chunk.choices)
    assert "Paris" in text and "." not in text
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_malformed_requests_raise_bad_request(client: openai.OpenAI, device: Device) -> None:
    with pytest.raises(openai.BadRequestError) as raised:
        client.chat.completions.create(model=MODEL_ID, messages=QUESTION, max_tokens=-1)  # type: ignore[arg-type]
    assert raised.value.status_code == 400
    assert raised.value.param == "max_tokens"
    with pytest.raises(openai.BadRequestError, match="8"):
        client.chat.completions.create(model=MODEL_ID, messages=QUESTION, n=9)  # type: ignore[arg-type]
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL_ID, messages=[])
    with pytest.raises(openai.BadRequestError) as too_long:
        client.completions.create(model=MODEL_ID, prompt="hello " * 2000, max_tokens=4)
    assert too_long.value.code == "context_length_exceeded"
    errors = [stats.error for stats in device.recorder.wait_for(4)]
    assert errors[-1] == "context_length_exceeded" and all(errors)


def test_unknown_model_raises_not_found(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as raised:
        client.chat.completions.create(model="gpt-4o", messages=QUESTION)  # type: ignore[arg-type]
    assert raised.value.code == "model_not_found"


def test_no_model_is_503_then_recovers(client: openai.OpenAI, device: Device) -> None:
    previous = device.active.remove(MODEL_ID)
    assert previous is not None
    try:
        with pytest.raises(openai.InternalServerError) as raised:
            client.completions.create(model=MODEL_ID, prompt="Hi", max_tokens=2)
        assert raised.value.status_code == 503
        assert raised.value.code == "model_not_loaded"
        assert client.models.list().data == []
        assert httpx.get(f"{device.base_url}/healthz").status_code == 503
    finally:
        device.active.put(previous)
    assert client.completions.create(model=MODEL_ID, prompt="Hi", max_tokens=2).choices
    health = httpx.get(f"{device.base_url}/healthz")
    assert health.status_code == 200
    assert health.json() == {
        "state": "active",
        "status": "ok",
        "model": MODEL_ID,
        "runtime": "llama.cpp",
        "models": [{"id": MODEL_ID, "runtime": "llama.cpp"}],
    }


def test_raw_malformed_json_gets_openai_error(device: Device) -> None:
    response = httpx.post(
        f"{device.base_url}/v1/chat/completions",
        content=b'{"model": "x", "messages": [',
        headers={"content-type": "application/json"},
    )
    assert response.status_code == 400
    assert response.json()["error"]["type"] == "invalid_request_error"


def test_client_disconnect_stops_generation(device: Device) -> None:
    device.recorder.clear()
    body = {
        "model": MODEL_ID,
        "prompt": "1, 2, 3, 4, 5,",
        "max_tokens": 300,
        "temperature": 0,
        "stream": True,
    }
    with (
        httpx.Client(timeout=60) as http,
        http.stream("POST", f"{device.base_url}/v1/completions", json=body) as response,
    ):
        assert response.status_code == 200
        lines = response.iter_lines()
        received = [line for _, line in zip(range(6), lines, strict=False)]
        assert received[0].startswith("data: ")
    # Leaving the block closed the connection mid-stream.
    (stats,) = device.recorder.wait_for(1)
    assert stats.error == "client_disconnected"
    assert stats.completion_tokens < 100
    device.wait_idle()


def test_client_timeout_stops_a_non_streamed_generation(device: Device) -> None:
    device.recorder.clear()
    body = {"model": MODEL_ID, "prompt": "1, 2, 3, 4, 5,", "max_tokens": 900, "temperature": 0}
    with pytest.raises(httpx.ReadTimeout):  # the client gives up and closes the connection
        httpx.post(f"{device.base_url}/v1/completions", json=body, timeout=httpx.Timeout(60, read=0.3))
    (stats,) = device.recorder.wait_for(1)
    assert stats.error == "client_disconnected"
    assert stats.completion_tokens < 600
    device.wait_idle()


def test_a_full_queue_raises_rate_limit_error(runtime: Runtime) -> None:
    app = create_app(
        models=ModelTable(runtime),
        observer=lambda stats: None,
        limits=QueueLimits(max_running=1, max_waiting=0),
    )
    queue: AdmissionQueue = app.state.admission_queue
    with serving(app) as base_url:
        client = openai.OpenAI(base_url=f"{base_url}/v1", api_key="not-needed", max_retries=0, timeout=60)
        held = asyncio.run(queue.admit())  # a request in progress, held for as long as the test needs
        try:
            with pytest.raises(openai.RateLimitError) as raised:
                client.completions.create(model=MODEL_ID, prompt="Hi", max_tokens=2)
        finally:
            held.release()
        assert raised.value.code == "queue_full"
        assert int(raised.value.response.headers["retry-after"]) >= 1
        assert client.completions.create(model=MODEL_ID, prompt="Hi", max_tokens=2).choices
        metrics = httpx.get(f"{base_url}/metrics").text
        assert "edgefleet_api_queue_rejected_total 1.0" in metrics


def test_concurrent_clients_are_all_served(client: openai.OpenAI) -> None:
    results: list[str] = []
    errors: list[BaseException] = []

    def ask() -> None:
        try:
            response = client.chat.completions.create(
                model=MODEL_ID,
                messages=QUESTION,  # type: ignore[arg-type]
                max_tokens=8,
                temperature=0,
            )
            results.append(response.choices[0].message.content or "")
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=ask) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert errors == []
    assert len(results) == 3 and len(set(results)) == 1


# --- logprobs, echo, logit_bias, top_k, n and context limits (real SmolLM2) -------------------


def test_chat_logprobs(client: openai.OpenAI) -> None:
    response = client.chat.completions.create(
        model=MODEL_ID, messages=QUESTION, max_tokens=8, temperature=0, logprobs=True, top_logprobs=3
    )
    choice = response.choices[0]
    assert choice.logprobs is not None and choice.logprobs.content
    content = choice.logprobs.content
    assert len(content) == response.usage.completion_tokens  # type: ignore[union-attr]
    assert "".join(entry.token for entry in content).startswith(choice.message.content or "")
    for entry in content:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 3
        # Greedy decoding picks the likeliest token, which is therefore the first candidate.
        assert entry.top_logprobs[0].token == entry.token
        assert math.isclose(entry.top_logprobs[0].logprob, entry.logprob)
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob


def test_chat_logprobs_streamed_match_plain(client: openai.OpenAI) -> None:
    kwargs: dict[str, Any] = {
        "model": MODEL_ID,
        "messages": QUESTION,
        "max_tokens": 8,
        "temperature": 0,
        "logprobs": True,
    }
    plain = client.chat.completions.create(**kwargs).choices[0].logprobs
    streamed = []
    for chunk in client.chat.completions.create(stream=True, **kwargs):
        for choice in chunk.choices:
            if choice.logprobs is not None and choice.logprobs.content:
                streamed += choice.logprobs.content
    assert plain is not None and plain.content
    assert [e.token for e in streamed] == [e.token for e in plain.content]
    for got, expected in zip(streamed, plain.content, strict=True):
        assert math.isclose(got.logprob, expected.logprob, abs_tol=1e-4)


def test_completion_logprobs(client: openai.OpenAI) -> None:
    response = client.completions.create(
        model=MODEL_ID, prompt="The capital of France is", max_tokens=5, temperature=0, logprobs=2
    )
    choice = response.choices[0]
    assert choice.logprobs is not None and choice.logprobs.tokens
    assert "".join(choice.logprobs.tokens) == choice.text
    assert choice.logprobs.text_offset == [
        sum(len(t) for t in choice.logprobs.tokens[:i]) for i in range(len(choice.logprobs.tokens))
    ]
    assert choice.logprobs.token_logprobs and all(
        lp is not None and lp <= 0 for lp in choice.logprobs.token_logprobs
    )
    assert choice.logprobs.top_logprobs and all(len(top) <= 2 for top in choice.logprobs.top_logprobs)


def test_completion_echo(client: openai.OpenAI) -> None:
    prompt = "The capital of France is"
    plain = client.completions.create(model=MODEL_ID, prompt=prompt, max_tokens=4, temperature=0)
    echoed = client.completions.create(model=MODEL_ID, prompt=prompt, max_tokens=4, temperature=0, echo=True)
    assert echoed.choices[0].text == prompt + plain.choices[0].text
    with pytest.raises(openai.BadRequestError) as raised:
        client.completions.create(model=MODEL_ID, prompt=prompt, max_tokens=4, echo=True, logprobs=1)
    assert raised.value.param == "logprobs"


def test_logit_bias_bans_and_forces_tokens(client: openai.OpenAI, device: Device) -> None:
    prompt = "The capital of France is"
    plain = client.completions.create(model=MODEL_ID, prompt=prompt, max_tokens=3, temperature=0)
    first = client.completions.create(model=MODEL_ID, prompt=prompt, max_tokens=1, temperature=0, logprobs=0)
    assert first.choices[0].logprobs is not None and first.choices[0].logprobs.tokens
    token = first.choices[0].logprobs.tokens[0]
    token_id = device.runtime.tokenize(token, add_special=False)[0]  # type: ignore[attr-defined]
    banned = client.completions.create(
        model=MODEL_ID, prompt=prompt, max_tokens=3, temperature=0, logit_bias={str(token_id): -100}
    )
    assert not banned.choices[0].text.startswith(token) and plain.choices[0].text.startswith(token)
    forced = client.completions.create(
        model=MODEL_ID, prompt="Hello", max_tokens=3, temperature=1, seed=3, logit_bias={str(token_id): 100}
    )
    assert forced.choices[0].text == token * 3


def test_null_fields_mean_defaults(client: openai.OpenAI) -> None:
    response = client.chat.completions.create(
        model=MODEL_ID,
        messages=QUESTION,
        max_tokens=4,
        n=None,
        stream=None,  # type: ignore[call-overload]
        frequency_penalty=None,
        presence_penalty=None,
        extra_body={"top_k": None, "top_logprobs": None, "logit_bias": None},
    )
    assert response.choices[0].message.content


def test_max_tokens_beyond_the_context_is_refused(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as raised:
        client.chat.completions.create(model=MODEL_ID, messages=QUESTION, max_completion_tokens=5000)
    assert raised.value.code == "context_length_exceeded"
    assert "1024" in raised.value.message


def test_n_choices(client: openai.OpenAI) -> None:
    response = client.chat.completions.create(
        model=MODEL_ID, messages=QUESTION, max_tokens=6, temperature=1, seed=11, n=3
    )
    assert [choice.index for choice in response.choices] == [0, 1, 2]
    assert all(choice.message.content for choice in response.choices)
    assert response.usage is not None and response.usage.completion_tokens <= 18
    again = client.chat.completions.create(
        model=MODEL_ID, messages=QUESTION, max_tokens=6, temperature=1, seed=11, n=3
    )
    assert [c.message.content for c in again.choices] == [c.message.content for c in response.choices]
    streamed: dict[int, str] = {}
    for chunk in client.completions.create(
        model=MODEL_ID, prompt="Once upon a time", max_tokens=5, temperature=0, n=2, stream=True
    ):
        for choice in chunk.choices:
            streamed[choice.index] = streamed.get(choice.index, "") + choice.text
    assert set(streamed) == {0, 1} and streamed[0] == streamed[1]  # greedy: the same twice


def test_images_are_refused_clearly(client: openai.OpenAI) -> None:
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
    with pytest.raises(openai.BadRequestError) as raised:
        client.chat.completions.create(
            model=MODEL_ID,
            messages=[{"role": "user", "content": [image]}],  # type: ignore[list-item]
            max_tokens=4,
        )
    assert "no images" in raised.value.message


def test_retrieve_model(client: openai.OpenAI) -> None:
    assert client.models.retrieve(MODEL_ID).id == MODEL_ID
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4o")
