"""LoRA adapters over the real SmolLM2-135M-Instruct GGUF, built by bench.lora_build and chosen
per request; comparisons are within one process, so no figure depends on this CPU's numerics."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from bench.lora_build import build_lora, mismatched_lora
from edgefleet.agent.runtimes import ChatMessage, Runtime, SamplingParams, load_runtime
from edgefleet.agent.runtimes.base import Capability, FieldNotSupported, LoraRequest
from edgefleet.agent.runtimes.keep_alive import KeepAliveRuntime
from edgefleet.agent.runtimes.llama_adapters import DEFAULT_MAX_LORAS
from edgefleet.agent.runtimes.llama_cpp import LlamaCppRuntime
from edgefleet.agent.runtimes.lora import (
    LoraFileInvalid,
    LoraLoadFailed,
    LoraMismatch,
    LoraNameRefused,
    LoraRuntime,
    TooManyLoras,
    UnknownLora,
)
from edgefleet.protos.fleet.v1 import common_pb2

pytestmark = pytest.mark.integration

N_CTX = 512
QUESTION = [ChatMessage(role="user", content="What is the capital of France?")]
PROMPT = "The three most important inventions in history are"
SEEDED = SamplingParams(max_tokens=16, temperature=0.0, seed=0)  # every prompt token evaluated afresh
GREEDY = SamplingParams(max_tokens=16, temperature=0.0)  # reuses the cache where it may


def with_lora(params: SamplingParams, name: str, scale: float = 1.0) -> SamplingParams:
    return SamplingParams(
        max_tokens=params.max_tokens,
        temperature=params.temperature,
        seed=params.seed,
        lora=LoraRequest(name, scale),
    )


@pytest.fixture(scope="module")
def adapters(tmp_path_factory: pytest.TempPathFactory, smollm2_path: Path) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("loras")
    return {
        f"style{seed}": build_lora(smollm2_path, folder / f"style{seed}.gguf", seed=seed) for seed in (0, 1)
    }


@pytest.fixture(scope="module")
def runtime(smollm2_path: Path, adapters: dict[str, Path]) -> Iterator[LlamaCppRuntime]:
    loaded = load_runtime(
        fmt=common_pb2.MODEL_FORMAT_GGUF, model_path=smollm2_path, model_id="smollm2", n_ctx=N_CTX
    )
    assert isinstance(loaded, LlamaCppRuntime)
    for name, path in adapters.items():
        loaded.load_lora(name, path)
    yield loaded
    loaded.unload()


def _evaluated(runtime: LlamaCppRuntime, monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int]]:
    """Spies on the batches llama.cpp evaluates: (tokens already in the cache, batch size)."""
    llama: Any = runtime._llama
    calls: list[tuple[int, int]] = []
    evaluate = llama.eval

    def spy(tokens: Sequence[int]) -> None:
        calls.append((int(llama.n_tokens), len(tokens)))
        evaluate(tokens)

    monkeypatch.setattr(llama, "eval", spy)
    return calls


def test_runtime_offers_lora(runtime: LlamaCppRuntime, adapters: dict[str, Path]) -> None:
    assert isinstance(runtime, LoraRuntime)
    assert Capability.LORA in runtime.describe().capabilities
    listed = runtime.loras()
    assert [info.name for info in listed] == sorted(adapters)
    for info in listed:
        assert info.path == adapters[info.name]
        assert info.size_bytes == adapters[info.name].stat().st_size
        assert (info.rank, info.alpha, info.architecture) == (8, 8.0, "llama")
        assert info.tensors == 60  # attn_q and attn_v of 30 layers


def test_an_adapter_changes_the_greedy_output(runtime: LlamaCppRuntime) -> None:
    base = runtime.chat(QUESTION, SEEDED)
    styled = [runtime.chat(QUESTION, with_lora(SEEDED, name)) for name in ("style0", "style1")]
    assert base.text.strip()
    assert all(result.text != base.text for result in styled)
    assert styled[0].text != styled[1].text
    assert runtime.chat(QUESTION, with_lora(SEEDED, "style0")) == styled[0]  # deterministic


def test_scale_zero_is_the_base(runtime: LlamaCppRuntime) -> None:
    base = runtime.complete(PROMPT, SEEDED)
    assert runtime.complete(PROMPT, with_lora(SEEDED, "style0", 0.0)) == base


def test_base_requests_between_adapter_requests_keep_the_base_output(runtime: LlamaCppRuntime) -> None:
    """Unseeded requests reuse the KV cache's prefix: a base request on the prompt an adapter
    request just filled the cache with must not reuse keys and values the adapter computed.
    Each is compared with itself repeated (the same cached cells, the same batches evaluated)."""
    runtime.complete(PROMPT, GREEDY)
    base = runtime.complete(PROMPT, GREEDY).text
    runtime.complete(PROMPT, with_lora(GREEDY, "style1"))
    styled = runtime.complete(PROMPT, with_lora(GREEDY, "style1")).text
    assert styled != base
    for _ in range(2):
        assert runtime.complete(PROMPT, GREEDY).text == base
        assert runtime.complete(PROMPT, with_lora(GREEDY, "style1")).text == styled
        assert runtime.complete(PROMPT, with_lora(GREEDY, "style0")).text != base


def test_each_adapter_reuses_only_its_own_cached_prompt(
    runtime: LlamaCppRuntime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Structural, so it holds on any CPU: a request reuses a cached prompt prefix only if its
    own adapter and scale (or the base) computed it; the cache of an adapter giving way is set
    aside and put back when that adapter returns."""
    prompt = "Zebras crossing a wide river at dawn"
    calls = _evaluated(runtime, monkeypatch)
    tokens = runtime.complete(prompt, with_lora(GREEDY, "style0")).prompt_tokens
    for params, reused in [
        (with_lora(GREEDY, "style1"), False),  # style0 computed the cache
        (with_lora(GREEDY, "style0"), True),  # its own cache, put back
        (with_lora(GREEDY, "style1", 0.5), False),  # another scale
        (GREEDY, False),
        (GREEDY, True),
        (with_lora(GREEDY, "style1", 0.0), True),  # scale 0 is the base
        (with_lora(GREEDY, "style1"), True),  # put back
        (with_lora(SEEDED, "style0"), False),  # a seeded request never reuses
    ]:
        calls.clear()
        runtime.complete(prompt, params)
        assert (calls[0][0] > 0) is reused, (params.lora, calls[0])
        assert calls[0][0] + calls[0][1] == tokens


def test_set_aside_caches_are_bounded(runtime: LlamaCppRuntime, monkeypatch: pytest.MonkeyPatch) -> None:
    """With no room for them, set-aside caches are not kept: a returning adapter starts afresh."""
    from edgefleet.agent.runtimes.llama_prompt_states import PromptStates

    monkeypatch.setattr(runtime._loras, "_prompts", PromptStates(max_bytes=0))
    calls = _evaluated(runtime, monkeypatch)
    runtime.complete(PROMPT, with_lora(GREEDY, "style0"))
    runtime.complete(PROMPT, GREEDY)
    calls.clear()
    tokens = runtime.complete(PROMPT, with_lora(GREEDY, "style0")).prompt_tokens
    assert calls[0] == (0, tokens)
    small = PromptStates(max_bytes=64 * 1024)  # a few tokens' cells: this prompt's do not fit
    monkeypatch.setattr(runtime._loras, "_prompts", small)
    runtime.complete(PROMPT, GREEDY)
    assert small.saved_bytes == 0


def test_unknown_adapter_is_refused_before_queueing(runtime: LlamaCppRuntime) -> None:
    with pytest.raises(UnknownLora) as refused:
        runtime.chat_stream(QUESTION, with_lora(GREEDY, "nope"))
    assert refused.value.loaded == ("style0", "style1")
    with pytest.raises(UnknownLora):
        runtime.chat_stream(QUESTION, with_lora(GREEDY, "nope", 0.0))
    with pytest.raises(FieldNotSupported):
        runtime.chat_stream(QUESTION, with_lora(GREEDY, "style0", float("nan")))
    with pytest.raises(UnknownLora):
        runtime.unload_lora("nope")


def test_loading_and_unloading_leave_a_base_stream_intact(
    runtime: LlamaCppRuntime, adapters: dict[str, Path]
) -> None:
    """Adapters come and go between two tokens of a base stream, which goes on unchanged."""
    whole = runtime.complete(PROMPT, SEEDED)
    generation = runtime.complete_stream(PROMPT, SEEDED)
    parts = [next(generation).text]
    runtime.load_lora("extra", adapters["style0"])  # while the stream holds the model
    parts.append(next(generation).text)
    started = time.monotonic()
    runtime.unload_lora("extra")
    assert time.monotonic() - started < 30  # did not wait for the stream to end
    parts.extend(delta.text for delta in generation)
    assert "".join(parts) == whole.text
    assert [info.name for info in runtime.loras()] == ["style0", "style1"]


def test_unloading_an_adapter_in_use_lets_its_stream_finish(
    runtime: LlamaCppRuntime, adapters: dict[str, Path]
) -> None:
    runtime.load_lora("going", adapters["style1"])
    params = with_lora(SEEDED, "going")
    whole = runtime.complete(PROMPT, params)
    generation = runtime.complete_stream(PROMPT, params)
    parts = [next(generation).text]
    unloaded = threading.Event()

    def unload() -> None:
        runtime.unload_lora("going")
        unloaded.set()

    thread = threading.Thread(target=unload)
    thread.start()
    assert unloaded.wait(30)  # new requests are refused at once, the stream keeps its adapter
    with pytest.raises(UnknownLora):
        runtime.complete_stream(PROMPT, params)
    parts.extend(delta.text for delta in generation)
    thread.join()
    assert "".join(parts) == whole.text
    base = runtime.complete(PROMPT, SEEDED)  # the freed adapter is off the context
    assert base.text == runtime.complete(PROMPT, with_lora(SEEDED, "style0", 0.0)).text
    assert base.text != whole.text


def test_a_file_that_is_no_lora_adapter_is_refused(
    runtime: LlamaCppRuntime, adapters: dict[str, Path], smollm2_path: Path, tmp_path: Path
) -> None:
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(adapters["style0"].read_bytes()[:-4096])
    noise = tmp_path / "noise.gguf"
    noise.write_bytes(b"GGUF" + bytes(range(256)) * 16)
    for path in (truncated, noise, smollm2_path, tmp_path / "missing.gguf", tmp_path):
        with pytest.raises(LoraFileInvalid):
            runtime.load_lora("broken", path)
    assert [info.name for info in runtime.loras()] == ["style0", "style1"]


def test_an_adapter_for_another_model_is_refused(
    runtime: LlamaCppRuntime, smollm2_path: Path, tmp_path: Path
) -> None:
    wrong_shape = mismatched_lora(smollm2_path, tmp_path / "shape.gguf")
    with pytest.raises(LoraMismatch) as refused:
        runtime.load_lora("misfit", wrong_shape)
    assert refused.value.tensor == "blk.0.attn_q.weight"
    other_arch = build_lora(smollm2_path, tmp_path / "arch.gguf", rank=2, architecture="gemma3")
    with pytest.raises(LoraMismatch):
        runtime.load_lora("misfit", other_arch)
    assert [info.name for info in runtime.loras()] == ["style0", "style1"]


def test_llama_cpp_refusing_a_file_is_typed(
    runtime: LlamaCppRuntime, smollm2_path: Path, tmp_path: Path
) -> None:
    """What llama.cpp itself answers (NULL) for a file that got past the checks is a typed
    refusal too, and registers nothing."""
    from edgefleet.agent.runtimes.lora import LoraInfo

    wrong_shape = mismatched_lora(smollm2_path, tmp_path / "shape.gguf")
    info = LoraInfo(
        name="unchecked", path=wrong_shape, size_bytes=1, rank=4, alpha=4.0, tensors=1, architecture="llama"
    )
    with pytest.raises(LoraLoadFailed):
        runtime._thread.call(lambda: runtime._loras._init(info))
    assert [info.name for info in runtime.loras()] == ["style0", "style1"]


def test_names_are_checked_and_bounded(runtime: LlamaCppRuntime, adapters: dict[str, Path]) -> None:
    for name in ("", "a/b", "a:b", "-x", "x" * 65):
        with pytest.raises(LoraNameRefused):
            runtime.load_lora(name, adapters["style0"])
    with pytest.raises(LoraNameRefused):
        runtime.load_lora("style0", adapters["style1"])
    added = [f"more{index}" for index in range(DEFAULT_MAX_LORAS - len(adapters))]
    for name in added:
        runtime.load_lora(name, adapters["style0"])
    try:
        with pytest.raises(TooManyLoras):
            runtime.load_lora("one-too-many", adapters["style0"])
    finally:
        for name in added:
            runtime.unload_lora(name)


def test_unloading_the_runtime_frees_its_adapters(smollm2_path: Path, adapters: dict[str, Path]) -> None:
    loaded = load_runtime(
        fmt=common_pb2.MODEL_FORMAT_GGUF, model_path=smollm2_path, model_id="smollm2", n_ctx=N_CTX
    )
    assert isinstance(loaded, LlamaCppRuntime)
    loaded.load_lora("a", adapters["style0"])
    loaded.load_lora("b", adapters["style1"])
    loaded.complete(PROMPT, with_lora(SEEDED, "a"))  # "a" stays set on the context
    loaded.unload_lora("b")
    loaded.unload()
    assert loaded.loras() == ()
    loaded.unload()  # idempotent


def test_adapters_outlive_a_keep_alive_unload(smollm2_path: Path, adapters: dict[str, Path]) -> None:
    """Adapters loaded through the keep-alive wrapper are loaded again with the model."""

    def load() -> Runtime:
        return load_runtime(
            fmt=common_pb2.MODEL_FORMAT_GGUF, model_path=smollm2_path, model_id="smollm2", n_ctx=N_CTX
        )

    runtime = KeepAliveRuntime(load(), reload=load, keep_alive_s=0.3, footprint_bytes=1000)
    try:
        assert isinstance(runtime, LoraRuntime)
        runtime.load_lora("style0", adapters["style0"])
        assert runtime.footprint_bytes == 1000 + adapters["style0"].stat().st_size  # the budget counts it
        styled = runtime.complete(PROMPT, with_lora(SEEDED, "style0"))
        assert until(lambda: not runtime.loaded)
        assert [info.name for info in runtime.loras()] == ["style0"]  # listed while unloaded
        assert runtime.complete(PROMPT, with_lora(SEEDED, "style0")) == styled  # loaded again with it
        runtime.unload_lora("style0")
        with pytest.raises(UnknownLora):
            runtime.complete(PROMPT, with_lora(SEEDED, "style0"))
        runtime.load_lora("style1", adapters["style1"])
        assert until(lambda: not runtime.loaded)
        runtime.unload_lora("style1")  # forgotten without loading the model
        assert not runtime.loaded and runtime.loras() == () and runtime.footprint_bytes == 1000
        with pytest.raises(UnknownLora):
            runtime.unload_lora("style1")
    finally:
        runtime.unload()


def until(condition: Callable[[], bool], timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True
