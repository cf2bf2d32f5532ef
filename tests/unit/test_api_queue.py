"""The admission queue (running/waiting limits, 429) and cancellation when clients leave."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from edgefleet.agent.api import create_app
from edgefleet.agent.api.admission import AdmissionQueue, QueueFull, QueueLimits
from edgefleet.agent.runtimes.model_table import ModelTable
from tests.unit.test_api import FakeRuntime, Recorder, chat_body, completion_body


async def settle(condition: Callable[[], bool]) -> None:
    """Yield to the loop (and worker threads) until `condition` holds (state set by threads: polled)."""
    async with asyncio.timeout(5):
        while not condition():  # noqa: ASYNC110
            await asyncio.sleep(0.005)


# --- AdmissionQueue ------------------------------------------------------------------------


async def test_queue_admits_up_to_the_limit_then_queues_in_order() -> None:
    queue = AdmissionQueue(QueueLimits(max_running=2, max_waiting=2))
    first, second = await queue.admit(), await queue.admit()
    order: list[str] = []

    async def wait(name: str) -> None:
        slot = await queue.admit()
        order.append(name)
        slot.release()

    waiters = [asyncio.create_task(wait("a")), asyncio.create_task(wait("b"))]
    await settle(lambda: queue.waiting == 2)
    assert (queue.running, queue.waiting) == (2, 2)
    with pytest.raises(QueueFull) as full:
        await queue.admit()
    assert full.value.retry_after_s >= 1
    assert queue.rejected == 1
    await asyncio.to_thread(first.release)  # released from another thread, as generation threads do
    await asyncio.gather(*waiters)
    assert order == ["a", "b"]
    second.release()
    second.release()  # idempotent
    assert (queue.running, queue.waiting) == (0, 0)


async def test_a_cancelled_waiter_leaves_the_line() -> None:
    queue = AdmissionQueue(QueueLimits(max_running=1, max_waiting=1))
    slot = await queue.admit()
    waiter = asyncio.create_task(queue.admit())
    await settle(lambda: queue.waiting == 1)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert queue.waiting == 0
    slot.release()
    assert queue.running == 0
    (await queue.admit()).release()


async def test_no_waiting_room_rejects_at_once() -> None:
    queue = AdmissionQueue(QueueLimits(max_running=1, max_waiting=0))
    slot = await queue.admit()
    with pytest.raises(QueueFull):
        await queue.admit()
    slot.release()


def test_limits_are_validated() -> None:
    with pytest.raises(ValueError, match="max_running"):
        QueueLimits(max_running=0)
    with pytest.raises(ValueError, match="max_waiting"):
        QueueLimits(max_waiting=-1)


# --- over HTTP ---------------------------------------------------------------------------------


async def test_requests_beyond_the_queue_get_429_with_retry_after() -> None:
    gate = threading.Event()
    runtime = FakeRuntime(gate=gate)
    recorder = Recorder()
    app = create_app(
        models=ModelTable(runtime), observer=recorder, limits=QueueLimits(max_running=1, max_waiting=1)
    )
    queue: AdmissionQueue = app.state.admission_queue
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://device") as client:
        running = asyncio.create_task(client.post("/v1/chat/completions", json=chat_body()))
        await settle(lambda: queue.running == 1)
        waiting = asyncio.create_task(client.post("/v1/completions", json=completion_body()))
        await settle(lambda: queue.waiting == 1)
        refused = await client.post("/v1/embeddings", json={"model": "fake-model", "input": "hi"})
        assert refused.status_code == 429
        assert int(refused.headers["retry-after"]) >= 1
        error = refused.json()["error"]
        assert error["type"] == "rate_limit_exceeded" and error["code"] == "queue_full"
        assert (await client.get("/healthz")).status_code == 200  # not queued
        gate.set()
        assert (await running).status_code == 200
        assert (await waiting).status_code == 200
        metrics = (await client.get("/metrics")).text
    assert "edgefleet_api_queue_rejected_total 1.0" in metrics
    assert 'edgefleet_api_errors_total{code="queue_full",endpoint="/v1/embeddings"} 1.0' in metrics
    assert [stats.error for stats in recorder.stats].count("queue_full") == 1
    assert (queue.running, queue.waiting) == (0, 0)


def asgi_request(path: str, body: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.4"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(b"content-type", b"application/json"), (b"host", b"device")],
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 8000),
    }


async def call_then_leave(app: Any, path: str, body: dict[str, Any], leave: asyncio.Event) -> list[Any]:
    """Drive the app as a server would for a client that disconnects once `leave` is set."""
    sent: list[Any] = []
    request_sent = False

    async def receive() -> dict[str, Any]:
        nonlocal request_sent
        if not request_sent:
            request_sent = True
            return {"type": "http.request", "body": json.dumps(body).encode(), "more_body": False}
        await leave.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await asyncio.wait_for(app(asgi_request(path, body), receive, send), timeout=10)
    return sent


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
async def test_non_streamed_request_stops_when_the_client_leaves(path: str) -> None:
    reply = " ".join(f"w{i}" for i in range(500))
    runtime = FakeRuntime(reply=reply, n_ctx=10_000, token_delay=0.005)
    active = ModelTable(runtime)
    recorder = Recorder()
    app = create_app(models=active, observer=recorder)
    body = chat_body(max_tokens=500) if "chat" in path else completion_body(max_tokens=500)
    leave = asyncio.Event()
    call = asyncio.create_task(call_then_leave(app, path, body, leave))
    await settle(lambda: bool(runtime.generations) and runtime.generations[-1].completion_tokens >= 3)
    leave.set()
    sent = await call
    generation = runtime.generations[-1]
    assert await asyncio.to_thread(generation.closed.wait, 5)
    assert generation.completion_tokens < 100, "generation kept running after the client left"
    assert await asyncio.to_thread(active.wait_idle, runtime, timeout=5)
    await settle(lambda: app.state.admission_queue.running == 0)
    assert sent[0]["status"] == 499
    assert recorder.only().error == "client_disconnected"


async def test_a_client_that_leaves_while_queued_frees_its_place() -> None:
    gate = threading.Event()
    runtime = FakeRuntime(gate=gate)
    recorder = Recorder()
    app = create_app(models=ModelTable(runtime), observer=recorder)
    queue: AdmissionQueue = app.state.admission_queue
    holder_leaves, waiter_leaves = asyncio.Event(), asyncio.Event()
    holder = asyncio.create_task(call_then_leave(app, "/v1/chat/completions", chat_body(), holder_leaves))
    await settle(lambda: queue.running == 1)
    waiter = asyncio.create_task(call_then_leave(app, "/v1/completions", completion_body(), waiter_leaves))
    await settle(lambda: queue.waiting == 1)
    waiter_leaves.set()
    assert (await waiter)[0]["status"] == 499
    assert queue.waiting == 0
    assert len(runtime.generations) == 1  # the queued request never reached the model
    gate.set()
    assert (await holder)[0]["status"] == 200
    await settle(lambda: queue.running == 0)
    assert sorted(stats.error for stats in recorder.stats) == ["", "client_disconnected"]
