"""The three sides bench.serving compares, each answering the same completion requests with the
same settings and timed the same way: llama-cpp-python called directly (the baseline), the
agent's device API and llama-cpp-python's own OpenAI server, both in child processes over HTTP.

Kept apart from the measurement (bench.serving) so the request and timing code the API and its
peer share is in one place: the two HTTP sides differ only in how their child starts.
"""

from __future__ import annotations

import http.client
import json
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import httpx

MODEL_ID = "smollm2-135m-instruct"
REPO_ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True, slots=True)
class Settings:
    """What every side runs with, the same on each, so the sides differ only in what serves."""

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
    from edgefleet.agent.tasks.api_server import bind_api_socket
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
