"""llama.cpp's pushed stream (each token handed on from llama's own thread, no hand-off per
token), through the keep-alive wrapper every device model wears: the same text as stepping
token by token, a cancel that stops within a token and frees the model, and an embedding
requested mid-stream served, not deadlocked."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from edgefleet.agent.runtimes import load_runtime
from edgefleet.agent.runtimes.base import Delta, PushingGeneration, Runtime, SamplingParams
from edgefleet.agent.runtimes.keep_alive import KeepAliveRuntime
from edgefleet.protos.fleet.v1 import common_pb2

PARAMS = SamplingParams(max_tokens=24, temperature=0.0, seed=7)


@pytest.fixture(scope="module")
def runtime(smollm2_path: Path) -> Iterator[KeepAliveRuntime]:
    def load() -> Runtime:
        return load_runtime(
            fmt=common_pb2.MODEL_FORMAT_GGUF,
            model_path=smollm2_path,
            model_id="smollm2",
            n_ctx=512,
            n_threads=1,
        )

    wrapped = KeepAliveRuntime(load(), reload=load, keep_alive_s=None)
    yield wrapped
    wrapped.unload()


def pushed(runtime: KeepAliveRuntime, cancel_after: int | None = None) -> list[Delta]:
    generation = runtime.complete_stream("The capital of France is", PARAMS)
    assert isinstance(generation, PushingGeneration), "the keep-alive wrapper hides the fast path"
    got: list[Delta] = []
    cancelled = threading.Event()

    def emit(delta: Delta) -> None:
        got.append(delta)
        if cancel_after is not None and len(got) >= cancel_after:
            cancelled.set()

    try:
        generation.stream_to(emit, cancelled)
    finally:
        generation.close()
    return got


def test_pushed_text_equals_stepped_text(runtime: KeepAliveRuntime) -> None:
    stepped = runtime.complete("The capital of France is", PARAMS).text
    assert "".join(d.text for d in pushed(runtime)) == stepped


def test_cancel_stops_within_a_token_and_frees_the_model(runtime: KeepAliveRuntime) -> None:
    assert len(pushed(runtime, cancel_after=3)) <= 4
    assert runtime.complete("Hello", SamplingParams(max_tokens=2, temperature=0.0)).text is not None


def test_embeddings_requested_mid_stream_are_served(runtime: KeepAliveRuntime) -> None:
    vectors: list[int] = []

    def emit_and_embed(delta: Delta) -> None:
        if not vectors:
            # From another thread, as an API request would: it must not wait for the stream's end.
            worker = threading.Thread(target=lambda: vectors.append(len(runtime.embed(["edge"]).vectors[0])))
            worker.start()
            emitted.append(worker)

    emitted: list[threading.Thread] = []
    generation = runtime.complete_stream("Once upon a time", SamplingParams(max_tokens=40, temperature=0.0))
    assert isinstance(generation, PushingGeneration)
    try:
        generation.stream_to(emit_and_embed, threading.Event())
    finally:
        generation.close()
    emitted[0].join(30)
    assert vectors and vectors[0] > 0
