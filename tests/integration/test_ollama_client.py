"""The official `ollama` client against the device's /api/* on a real uvicorn, serving real SmolLM2.

Every call the client makes for listing, showing, ps, chat, generate and embed goes through
unchanged, streamed and not where Ollama streams; refusals arrive as the client's
ResponseError with the status Ollama would use; the API key, the admission queue and the
telemetry are the ones /v1/* has.
"""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import ollama
import pytest
from fastapi import FastAPI

from edgefleet.agent.api import create_app
from edgefleet.agent.api.admission import AdmissionQueue, QueueLimits
from edgefleet.agent.api.auth import require_api_key
from edgefleet.agent.runtimes.base import Runtime
from edgefleet.agent.runtimes.model_table import ModelTable
from tests.integration.api_server import MODEL_ID, Recorder, loaded_smollm2, serving, smollm2_file

pytestmark = pytest.mark.integration

N_CTX = 1024
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
GREEDY = {"temperature": 0, "seed": 1, "num_predict": 16}
SHORT = {"temperature": 0, "num_predict": 8}


class Device:
    def __init__(self, base_url: str, recorder: Recorder, app: FastAPI) -> None:
        self.base_url = base_url
        self.recorder = recorder
        self.queue: AdmissionQueue = app.state.admission_queue


@pytest.fixture(scope="module")
def runtime() -> Iterator[Runtime]:
    with loaded_smollm2(n_ctx=N_CTX) as loaded:
        yield loaded


@pytest.fixture(scope="module")
def device(runtime: Runtime) -> Iterator[Device]:
    recorder = Recorder()
    app = create_app(models=ModelTable(runtime), observer=recorder)
    with serving(app) as base_url:
        yield Device(base_url, recorder, app)


@pytest.fixture
def client(device: Device, monkeypatch: pytest.MonkeyPatch) -> ollama.Client:
    monkeypatch.delenv("OLLAMA_API_KEY", raising=False)
    device.recorder.clear()
    return ollama.Client(host=device.base_url, timeout=120)


def assert_figures(final: Any, *, max_eval: int) -> None:
    """Ollama's figures: counts, and nanosecond durations that add up to the total."""
    assert final.done is True
    assert final.done_reason in ("stop", "length")
    assert final.prompt_eval_count and final.prompt_eval_count > 0
    assert final.eval_count is not None and 0 < final.eval_count <= max_eval
    parts = [final.load_duration, final.prompt_eval_duration, final.eval_duration]
    assert all(isinstance(part, int) and part >= 0 for part in parts)
    assert final.total_duration > 0
    assert abs(sum(parts) - final.total_duration) <= 1_000  # rounding to whole nanoseconds
    assert final.total_duration < 120 * 10**9  # nanoseconds, not microseconds or seconds
    created = datetime.fromisoformat(final.created_at.replace("Z", "+00:00"))
    assert abs((datetime.now(UTC) - created).total_seconds()) < 120


def test_version(client: ollama.Client, device: Device) -> None:
    version = httpx.get(f"{device.base_url}/api/version").json()["version"]
    assert [int(part) for part in version.split(".")] >= [0, 5, 0]


def test_list(client: ollama.Client) -> None:
    (model,) = client.list().models
    assert model.model == MODEL_ID
    assert model.size == smollm2_file().stat().st_size
    assert model.details is not None and model.details.format == "gguf"
    assert model.modified_at is not None and model.modified_at.year >= 2024
    assert model.digest and len(model.digest) == 64


def test_show(client: ollama.Client) -> None:
    shown = client.show(MODEL_ID)
    assert shown.capabilities == ["completion", "embedding"]
    assert shown.details is not None and shown.details.format == "gguf"
    assert shown.modelinfo is not None and shown.modelinfo["edgefleet.context_length"] == N_CTX
    assert shown.parameters is not None and "num_ctx" in shown.parameters
    assert client.show(f"{MODEL_ID}:latest").modelinfo == shown.modelinfo


def test_ps(client: ollama.Client) -> None:
    (model,) = client.ps().models
    assert model.model == MODEL_ID and model.name == MODEL_ID
    assert model.context_length == N_CTX
    assert model.size and model.size > 0
    assert model.size_vram == 0
    assert model.expires_at is not None and model.expires_at > datetime.now(UTC)


def test_chat(client: ollama.Client, device: Device) -> None:
    response = client.chat(model=MODEL_ID, messages=QUESTION, options=GREEDY)
    assert response.message.role == "assistant"
    assert response.message.content and response.message.content.strip()
    assert response.model == MODEL_ID
    assert_figures(response, max_eval=16)
    (stats,) = device.recorder.wait_for(1)
    assert stats.endpoint == "ollama.chat" and not stats.stream and stats.error == ""
    assert stats.completion_tokens == response.eval_count
    assert stats.prompt_tokens == response.prompt_eval_count


def test_chat_stream_matches_plain(client: ollama.Client, device: Device) -> None:
    plain = client.chat(model=MODEL_ID, messages=QUESTION, options=GREEDY)
    chunks = list(client.chat(model=MODEL_ID, messages=QUESTION, options=GREEDY, stream=True))
    assert len(chunks) > 2
    assert all(not chunk.done and chunk.done_reason is None for chunk in chunks[:-1])
    assert all(chunk.eval_count is None for chunk in chunks[:-1])
    final = chunks[-1]
    assert final.message.content == ""
    assert "".join(chunk.message.content or "" for chunk in chunks) == plain.message.content
    assert final.done_reason == plain.done_reason
    assert final.eval_count == plain.eval_count and final.prompt_eval_count == plain.prompt_eval_count
    assert_figures(final, max_eval=16)
    streamed = device.recorder.wait_for(2)[1]
    assert streamed.stream and streamed.error == "" and streamed.completion_tokens == plain.eval_count


def test_chat_stream_is_the_default(device: Device) -> None:
    body = {"model": MODEL_ID, "messages": QUESTION, "options": GREEDY}
    with httpx.stream("POST", f"{device.base_url}/api/chat", json=body, timeout=120) as response:
        assert response.headers["content-type"] == "application/x-ndjson"
        lines = [line for line in response.iter_lines() if line]
    assert len(lines) > 2 and '"done":true' in lines[-1]


def test_chat_stop_and_length(client: ollama.Client) -> None:
    short = client.chat(model=MODEL_ID, messages=QUESTION, options={"temperature": 0, "num_predict": 2})
    assert short.done_reason == "length" and short.eval_count == 2
    stopped = client.chat(
        model=MODEL_ID, messages=QUESTION, options={"temperature": 0, "num_predict": 32, "stop": ["France"]}
    )
    assert "France" not in (stopped.message.content or "")


def test_generate(client: ollama.Client, device: Device) -> None:
    response = client.generate(model=MODEL_ID, prompt="What is the capital of France?", options=GREEDY)
    assert response.response and response.response.strip()
    assert response.context is None
    assert_figures(response, max_eval=16)
    (stats,) = device.recorder.wait_for(1)
    assert stats.endpoint == "ollama.generate" and stats.error == ""


def test_generate_stream_matches_plain(client: ollama.Client) -> None:
    kwargs: dict[str, Any] = {"model": MODEL_ID, "prompt": "Name three colours.", "options": GREEDY}
    plain = client.generate(**kwargs)
    chunks = list(client.generate(**kwargs, stream=True))
    assert "".join(chunk.response or "" for chunk in chunks) == plain.response
    assert chunks[-1].done and chunks[-1].eval_count == plain.eval_count
    assert_figures(chunks[-1], max_eval=16)


def test_generate_raw_and_system(client: ollama.Client) -> None:
    raw = client.generate(
        model=MODEL_ID,
        prompt="The capital of France is",
        raw=True,
        options={"temperature": 0, "num_predict": 8},
    )
    assert "Paris" in (raw.response or "")
    templated = client.generate(
        model=MODEL_ID,
        prompt="Hello",
        system="Answer in one word.",
        options={"temperature": 0, "num_predict": 8},
    )
    assert templated.done
    with pytest.raises(ollama.ResponseError) as raised:
        client.generate(model=MODEL_ID, prompt="Hello", system="Be brief.", raw=True)
    assert raised.value.status_code == 400 and "raw" in raised.value.error


def test_load_requests(client: ollama.Client) -> None:
    loaded = client.generate(model=MODEL_ID)
    assert loaded.done and loaded.done_reason == "load" and loaded.response == ""
    chat = client.chat(model=MODEL_ID, messages=[])
    assert chat.done and chat.done_reason == "load" and chat.message.content == ""


def cosine(a: Sequence[float], b: Sequence[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b, strict=True))
    return dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))


def test_embed(client: ollama.Client, device: Device) -> None:
    texts = ["The cat sat on the mat.", "A cat is sitting on a mat.", "Quarterly revenue rose by 4%."]
    response = client.embed(model=MODEL_ID, input=texts)
    assert response.model == MODEL_ID
    vectors = response.embeddings
    assert len(vectors) == 3 and len({len(vector) for vector in vectors}) == 1 and len(vectors[0]) > 0
    assert cosine(vectors[0], vectors[1]) > cosine(vectors[0], vectors[2])
    assert response.prompt_eval_count and response.prompt_eval_count > 0
    assert response.total_duration and response.load_duration is not None
    assert response.load_duration <= response.total_duration < 120 * 10**9
    single = client.embed(model=MODEL_ID, input=texts[0])
    assert single.embeddings[0] == pytest.approx(vectors[0], rel=1e-5, abs=1e-5)
    legacy = client.embeddings(model=MODEL_ID, prompt=texts[0])
    assert list(legacy.embedding) == pytest.approx(vectors[0], rel=1e-5, abs=1e-5)
    assert list(client.embeddings(model=MODEL_ID, prompt="").embedding) == []
    with pytest.raises(ollama.ResponseError) as raised:
        client.embed(model=MODEL_ID, input=texts[0], dimensions=8)
    assert raised.value.status_code == 400 and "dimensions" in raised.value.error
    stats = device.recorder.wait_for(3)
    assert [s.endpoint for s in stats[:3]] == ["ollama.embed"] * 3


def test_options_are_checked(client: ollama.Client, device: Device) -> None:
    refusals = {
        "unknown": {"no_such_option": 1},
        "bad type": {"temperature": "warm"},
        "fleet-set": {"num_thread": 4},
        "unsupported": {"min_p": 0.1},
        "not neutral": {"repeat_penalty": 1.3},
        "window": {"num_ctx": N_CTX * 4},
    }
    for case, options in refusals.items():
        with pytest.raises(ollama.ResponseError) as raised:
            client.chat(model=MODEL_ID, messages=QUESTION, options=options)
        assert raised.value.status_code == 400, case
        assert next(iter(options)) in raised.value.error, case
    neutral = client.chat(
        model=MODEL_ID,
        messages=QUESTION,
        options={**GREEDY, "repeat_penalty": 1.0, "num_ctx": 512, "top_k": 20, "top_p": 0.5},
    )
    assert neutral.done
    assert device.queue.running == 0


CAPITAL = {
    "type": "object",
    "properties": {"country": {"type": "string"}, "capital": {"type": "string"}},
    "required": ["country", "capital"],
}


def test_format_json_and_schema(client: ollama.Client) -> None:
    ask = [{"role": "user", "content": "What is the capital of France? Answer in JSON."}]
    options = {"temperature": 0, "num_predict": 96}
    as_json = client.chat(model=MODEL_ID, messages=ask, format="json", options=options)
    assert as_json.done_reason == "stop"
    assert isinstance(json.loads(as_json.message.content or ""), dict)
    shaped = client.generate(model=MODEL_ID, prompt=ask[0]["content"], format=CAPITAL, options=options)
    assert shaped.done_reason == "stop"
    assert set(json.loads(shaped.response or "")) == {"country", "capital"}
    chunks = list(client.chat(model=MODEL_ID, messages=ask, format=CAPITAL, options=options, stream=True))
    streamed = json.loads("".join(chunk.message.content or "" for chunk in chunks))
    assert isinstance(streamed["capital"], str)
    with pytest.raises(ollama.ResponseError) as raised:
        client.chat(model=MODEL_ID, messages=ask, format={"type": "no-such-type"})
    assert raised.value.status_code == 400 and "format" in raised.value.error


def test_refused_fields(client: ollama.Client) -> None:
    with pytest.raises(ollama.ResponseError) as raised:
        client.chat(model=MODEL_ID, messages=QUESTION, think=True)
    assert raised.value.status_code == 400 and "think" in raised.value.error


def test_unknown_model_is_not_found(client: ollama.Client) -> None:
    for call in (
        lambda: client.chat(model="llama3.2", messages=QUESTION),
        lambda: client.show("llama3.2"),
    ):
        with pytest.raises(ollama.ResponseError) as raised:
            call()
        assert raised.value.status_code == 404 and "llama3.2" in raised.value.error


def test_model_management_is_the_fleets(client: ollama.Client, tmp_path: Path) -> None:
    blob = tmp_path / "model.gguf"
    blob.write_bytes(b"GGUF")
    calls = {
        "pull": lambda: client.pull("llama3.2"),
        "push": lambda: client.push("me/llama3.2"),
        "create": lambda: client.create(model="mine", from_=MODEL_ID),
        "copy": lambda: client.copy(MODEL_ID, "mine"),
        "delete": lambda: client.delete(MODEL_ID),
        "blob": lambda: client.create_blob(blob),
    }
    for name, call in calls.items():
        with pytest.raises(ollama.ResponseError) as raised:
            call()
        assert raised.value.status_code == 403, name
        assert "fleet" in raised.value.error, name
    assert [model.model for model in client.list().models] == [MODEL_ID]


def test_api_key_is_required_beyond_loopback(runtime: Runtime, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OLLAMA_API_KEY", raising=False)
    app = create_app(models=ModelTable(runtime), observer=lambda stats: None)
    require_api_key(app, "ef-secret")
    with serving(app) as base_url:
        with pytest.raises(ollama.ResponseError) as raised:
            ollama.Client(host=base_url).list()
        assert raised.value.status_code == 401
        keyed = ollama.Client(host=base_url, headers={"Authorization": "Bearer ef-secret"})
        assert [model.model for model in keyed.list().models] == [MODEL_ID]
        monkeypatch.setenv("OLLAMA_API_KEY", "ef-secret")
        assert ollama.Client(host=base_url).chat(model=MODEL_ID, messages=QUESTION, options=GREEDY).done


def test_a_full_queue_is_429(runtime: Runtime, monkeypatch: pytest.MonkeyPatch) -> None:
    """The same admission queue as /v1/*: a request in progress there turns an Ollama one away."""
    monkeypatch.delenv("OLLAMA_API_KEY", raising=False)
    app = create_app(
        models=ModelTable(runtime),
        observer=lambda stats: None,
        limits=QueueLimits(max_running=1, max_waiting=0),
    )
    queue: AdmissionQueue = app.state.admission_queue
    with serving(app) as base_url:
        client = ollama.Client(host=base_url, timeout=60)
        held = asyncio.run(queue.admit())
        try:
            with pytest.raises(ollama.ResponseError) as raised:
                client.chat(model=MODEL_ID, messages=QUESTION, options=GREEDY)
            assert raised.value.status_code == 429
            with pytest.raises(ollama.ResponseError):
                list(client.generate(model=MODEL_ID, prompt="Hi", stream=True))
        finally:
            held.release()
        assert client.chat(model=MODEL_ID, messages=QUESTION, options=GREEDY).done
        assert queue.rejected == 2


def test_async_client_streams(device: Device) -> None:
    async def chat() -> list[str]:
        client = ollama.AsyncClient(host=device.base_url, timeout=120)
        parts = []
        async for chunk in await client.chat(model=MODEL_ID, messages=QUESTION, options=GREEDY, stream=True):
            parts.append(chunk.message.content or "")
        return parts

    parts = asyncio.run(chat())
    assert len(parts) > 2 and "".join(parts).strip()
