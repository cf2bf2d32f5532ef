"""LoRA adapters chosen by model name through the device API: the official `openai` and `ollama`
clients against a real uvicorn serving the real SmolLM2 GGUF, with adapters built by
bench.lora_build loaded over it. Outputs are compared within this process only (seeded greedy
requests evaluate their prompt afresh), so nothing depends on this CPU's numerics."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import ollama
import openai
import pytest

from bench.lora_build import build_lora
from edgefleet.agent.api import create_app
from edgefleet.agent.runtimes.llama_cpp import LlamaCppRuntime
from edgefleet.agent.runtimes.model_table import ModelTable
from tests.integration.api_server import Recorder, loaded_smollm2, serving, smollm2_file

pytestmark = pytest.mark.integration

BASE = "smollm2"
ADAPTER = "style0"
STYLED = f"{BASE}:{ADAPTER}"
QUESTION: list[openai.types.chat.ChatCompletionMessageParam] = [
    {"role": "user", "content": "What is the capital of France?"}
]
SEEDED = {"temperature": 0.0, "seed": 0, "max_tokens": 16}  # greedy, the prompt evaluated afresh


@dataclass
class Device:
    base_url: str
    recorder: Recorder
    runtime: LlamaCppRuntime
    client: openai.OpenAI


@pytest.fixture(scope="module")
def device(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Device]:
    folder = tmp_path_factory.mktemp("loras")
    with loaded_smollm2(n_ctx=1024, model_id=BASE) as runtime:
        assert isinstance(runtime, LlamaCppRuntime)
        runtime.load_lora(ADAPTER, build_lora(smollm2_file(), folder / f"{ADAPTER}.gguf", seed=0))
        recorder = Recorder()
        app = create_app(models=ModelTable(runtime), observer=recorder)
        with serving(app) as base_url:
            client = openai.OpenAI(
                base_url=f"{base_url}/v1", api_key="not-needed", max_retries=0, timeout=120
            )
            yield Device(base_url, recorder, runtime, client)


def chat(device: Device, model: str) -> str:
    reply = device.client.chat.completions.create(model=model, messages=QUESTION, **SEEDED)  # type: ignore[call-overload]
    assert reply.model == model
    text = reply.choices[0].message.content
    assert isinstance(text, str)
    return text


def test_models_lists_the_adapter_with_its_parent(device: Device) -> None:
    cards = {card.id: card for card in device.client.models.list()}
    assert set(cards) == {BASE, STYLED}
    assert getattr(cards[STYLED], "parent", None) == BASE
    assert getattr(cards[BASE], "parent", None) is None
    assert device.client.models.retrieve(STYLED).model_dump()["parent"] == BASE
    with pytest.raises(openai.NotFoundError):
        device.client.models.retrieve(f"{BASE}:nope")


def test_the_adapter_changes_the_reply_and_leaves_the_base_alone(device: Device) -> None:
    before = chat(device, BASE)
    styled = chat(device, STYLED)
    after = chat(device, BASE)
    assert before.strip()
    assert styled != before
    assert after == before  # the adapter applied to its request only
    assert chat(device, STYLED) == styled


def test_requests_are_counted_under_the_adapter(device: Device) -> None:
    device.recorder.clear()
    chat(device, STYLED)
    chat(device, BASE)
    stats = device.recorder.wait_for(2)
    assert [(s.model, s.error) for s in stats] == [(STYLED, ""), (BASE, "")]


def test_streaming_applies_the_adapter(device: Device) -> None:
    whole = chat(device, STYLED)
    stream = device.client.chat.completions.create(model=STYLED, messages=QUESTION, stream=True, **SEEDED)  # type: ignore[call-overload]
    pieces, models = [], set()
    for chunk in stream:
        models.add(chunk.model)
        if chunk.choices and chunk.choices[0].delta.content:
            pieces.append(chunk.choices[0].delta.content)
    assert models == {STYLED}
    assert "".join(pieces) == whole


def test_completions_apply_the_adapter(device: Device) -> None:
    def complete(model: str) -> str:
        reply = device.client.completions.create(model=model, prompt="The sky is", **SEEDED)  # type: ignore[call-overload]
        assert reply.model == model
        return str(reply.choices[0].text)

    base = complete(BASE)
    assert complete(STYLED) != base
    assert complete(BASE) == base


def test_an_unknown_adapter_is_not_found_and_lists_what_is_served(device: Device) -> None:
    with pytest.raises(openai.NotFoundError) as refused:
        device.client.chat.completions.create(model=f"{BASE}:nope", messages=QUESTION, max_tokens=4)
    body = refused.value.body
    assert isinstance(body, dict) and body["code"] == "model_not_found"
    assert f"`{BASE}`" in body["message"] and f"`{STYLED}`" in body["message"]


def test_embeddings_never_apply_an_adapter(device: Device) -> None:
    with pytest.raises(openai.BadRequestError) as refused:
        device.client.embeddings.create(model=STYLED, input="hello")
    body = refused.value.body
    assert isinstance(body, dict) and body["code"] == "adapter_not_supported"
    assert "never apply an adapter" in body["message"]
    response = httpx.post(
        f"{device.base_url}/api/embed", json={"model": STYLED, "input": "hello"}, timeout=60
    )
    assert response.status_code == 400 and "never apply an adapter" in response.json()["error"]


def test_an_adapter_tokenizes_as_its_model(device: Device) -> None:
    def tokens(model: str) -> list[int]:
        response = httpx.post(
            f"{device.base_url}/tokenize", json={"model": model, "prompt": "Hello"}, timeout=60
        )
        assert response.status_code == 200
        return list(response.json()["tokens"])

    assert tokens(STYLED) == tokens(BASE)


def test_ollama_chats_with_the_adapter_and_lists_it(device: Device) -> None:
    client = ollama.Client(host=device.base_url, timeout=120)
    options = {"temperature": 0, "seed": 1, "num_predict": 16}
    styled = client.chat(model=STYLED, messages=QUESTION, options=options)
    base = client.chat(model=BASE, messages=QUESTION, options=options)
    assert styled.model == STYLED and base.model == BASE
    assert styled.message.content != base.message.content
    streamed = client.chat(model=STYLED, messages=QUESTION, options=options, stream=True)
    assert "".join(part.message.content or "" for part in streamed) == styled.message.content

    listed = {model.model: model for model in client.list().models}
    assert set(listed) == {BASE, STYLED}
    adapter = listed[STYLED]
    assert adapter.details is not None and adapter.details.parent_model == BASE
    assert adapter.size == Path(device.runtime.loras()[0].path).stat().st_size
    running = {model.model: model for model in client.ps().models}
    assert set(running) == {BASE, STYLED}
    assert client.show(STYLED).details.parent_model == BASE  # type: ignore[union-attr]
