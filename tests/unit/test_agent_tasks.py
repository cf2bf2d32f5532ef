"""The agent's tasks run under task groups and an exit stack: whatever ends the agent - a stop,
a failing task, a start-up step failing half-way - stops everything that had started, in
reverse order, and surfaces as one error."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from edgefleet.agent.config import AgentConfig
from edgefleet.agent.service import AgentService
from edgefleet.agent.tasks.api_server import ApiAddressUnavailable
from edgefleet.agent.tasks.supervise import (
    StopRequested,
    TaskEnded,
    start_essential,
    the_failure,
    until_stopped,
)
from edgefleet.agent.update.errors import NotEnrolled
from edgefleet.controlplane.trust.keys import KeyDir
from tests.conftest import free_port

EXIT_BOUND_SECONDS = 60.0  # generous: the agent gives up at its first start-up step


class Boom(Exception):
    pass


def other_tasks() -> set[asyncio.Task[object]]:
    return asyncio.all_tasks() - {asyncio.current_task()}  # type: ignore[operator]


async def wired(stop: asyncio.Event, events: list[str], *, fail_in: str | None) -> None:
    """The agent's shape with fakes: a resource, a front task group, a resource, a loop group."""

    async def loop(name: str) -> None:
        try:
            events.append(f"{name} running")
            if name == fail_in:
                raise Boom(name)
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            events.append(f"{name} cancelled")
            raise

    def closed(name: str) -> None:
        events.append(f"{name} closed")

    async with contextlib.AsyncExitStack() as stack:
        stack.callback(closed, "models")
        front = await stack.enter_async_context(asyncio.TaskGroup())
        start_essential(front, loop("api"), "api")
        stack.callback(closed, "link")
        loops = await stack.enter_async_context(asyncio.TaskGroup())
        start_essential(loops, loop("watch"), "watch")
        start_essential(loops, loop("heartbeat"), "heartbeat")
        stack.callback(closed, "api front door")
        await until_stopped(stop)


async def run_wired(stop: asyncio.Event, events: list[str], *, fail_in: str | None) -> BaseException | None:
    try:
        await wired(stop, events, fail_in=fail_in)
    except BaseException as exc:  # what ended it is the subject of the test
        return the_failure(exc)
    return None


async def test_a_stop_cancels_every_task_and_closes_in_reverse_start_order() -> None:
    stop, events = asyncio.Event(), []
    running = asyncio.create_task(run_wired(stop, events, fail_in=None))
    await asyncio.sleep(0.05)
    stop.set()
    assert await running is None  # a stop is no failure
    closing = [e for e in events if not e.endswith("running")]
    assert closing.index("api front door closed") < closing.index("watch cancelled")
    assert (
        closing.index("heartbeat cancelled") < closing.index("link closed") < closing.index("api cancelled")
    )
    assert closing[-1] == "models closed"
    assert other_tasks() == set()


@pytest.mark.parametrize("fail_in", ["watch", "api"])
async def test_a_failing_task_stops_the_rest_and_is_the_one_error(fail_in: str) -> None:
    stop, events = asyncio.Event(), []
    failure = await asyncio.wait_for(run_wired(stop, events, fail_in=fail_in), timeout=10)
    assert isinstance(failure, Boom) and failure.args == (fail_in,)
    others = {"api", "watch", "heartbeat"} - {fail_in}
    assert {f"{name} cancelled" for name in others} <= set(events)
    assert {"link closed", "models closed", "api front door closed"} <= set(events)
    assert other_tasks() == set()


async def test_a_task_that_returns_is_a_failure_not_a_silent_end() -> None:
    async def done_early() -> None:
        return None

    async def supervised() -> None:
        async with asyncio.TaskGroup() as group:
            start_essential(group, done_early(), "reporter")
            await until_stopped(asyncio.Event())

    with pytest.raises(BaseExceptionGroup) as caught:
        await supervised()
    failure = the_failure(caught.value)
    assert isinstance(failure, TaskEnded) and failure.name == "reporter"
    assert the_failure(BaseExceptionGroup("stopped", [StopRequested()])) is None


def config_for(tmp_path: Path, keys: KeyDir, port: int, token: str | None = None) -> AgentConfig:
    return AgentConfig(
        controlplane=f"127.0.0.1:{free_port()}",
        state_dir=tmp_path / "state",
        trust_path=keys.trust_path,
        token=token,
        listen_port=port,
    )


def port_open(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


async def test_a_start_up_failure_after_the_api_started_leaves_nothing_running(
    tmp_path: Path, keys: KeyDir
) -> None:
    """No identity and no token: enrollment fails once the API serves. The API must be gone,
    and no task or thread of the agent left behind."""
    threads_before = set(threading.enumerate())
    port = free_port()
    service = AgentService(config_for(tmp_path, keys, port))
    with pytest.raises(NotEnrolled):  # the error itself, not an exception group
        await asyncio.wait_for(service.run(), timeout=30)
    assert not port_open(port)
    assert other_tasks() == set()
    left = [t for t in set(threading.enumerate()) - threads_before if not process_wide(t)]
    assert left == []


def process_wide(thread: threading.Thread) -> bool:
    """Threads no agent owns: the loop's idle executor workers (asyncio_N, joined by
    asyncio.run) and gRPC's one completion-queue poller for all aio channels."""
    return thread.name.startswith("asyncio_") or thread.name.endswith("(_poll_wrapper)")


async def test_a_taken_api_port_is_one_error_naming_the_address(tmp_path: Path, keys: KeyDir) -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        service = AgentService(config_for(tmp_path, keys, port, token="unused"))
        with pytest.raises(ApiAddressUnavailable, match=f"127.0.0.1:{port} \\(--listen\\)"):
            await asyncio.wait_for(service.run(), timeout=30)
    assert other_tasks() == set()


def test_fleet_agent_with_its_port_taken_exits_non_zero_with_one_clear_error(
    tmp_path: Path, keys: KeyDir
) -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        argv = [
            sys.executable,
            "-m",
            "edgefleet.agent.cli",
            "run",
            "--controlplane",
            f"127.0.0.1:{free_port()}",
            "--trust",
            str(keys.trust_path),
            "--state-dir",
            str(tmp_path / "state"),
            "--listen",
            f"127.0.0.1:{port}",
            "--token",
            "unused",
        ]
        started = time.monotonic()
        try:
            done = subprocess.run(argv, capture_output=True, text=True, timeout=EXIT_BOUND_SECONDS)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the agent did not exit within {EXIT_BOUND_SECONDS:.0f} s with its port taken")
    print(f"agent exited {time.monotonic() - started:.2f} s after start")
    assert done.returncode == 1, done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("fleet-agent:")]
    assert errors == [
        f"fleet-agent: ApiAddressUnavailable: cannot listen on 127.0.0.1:{port} (--listen): "
        "Address already in use"
    ], done.stderr
    assert "Traceback" not in done.stderr
