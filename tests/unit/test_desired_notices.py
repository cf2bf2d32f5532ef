"""How the agent hears of desired-state changes without a stream: notice parsing and bounds, the
hand-over from paho's thread, when it polls, and the channel that lets its connection go; and
the control plane's side that tells listeners of the changes it commits."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import grpc
import pytest

from edgefleet.agent.device.channel import channel_options
from edgefleet.agent.tasks import desired_notices
from edgefleet.agent.tasks.control import DeviceRevoked
from edgefleet.agent.tasks.desired_notices import (
    MAX_NOTICE_BYTES,
    DesiredNotices,
    NoticeRefused,
    follow_notices,
    parse_notice,
)
from edgefleet.agent.update.latest import Latest
from edgefleet.controlplane.fleet.broker_notices import notice_payload
from edgefleet.controlplane.fleet.notifier import DesiredStateNotifier
from edgefleet.protos.fleet.topics import desired_topic
from edgefleet.protos.fleet.v1 import common_pb2, device_pb2


def state(generation: int) -> device_pb2.DesiredState:
    return device_pb2.DesiredState(generation=generation, bundle=common_pb2.BundleRef(name="m", version=3))


# --- the notice on the wire ---


def test_the_control_planes_payload_parses_back_to_the_same_state() -> None:
    assert parse_notice(notice_payload(state(7))) == state(7)


def test_unknown_fields_are_ignored() -> None:
    assert parse_notice(b'{"generation": "4", "future": {"x": 1}}').generation == 4


@pytest.mark.parametrize(
    "payload",
    [
        b"\xff\xfe",
        b"not json",
        b'{"generation": "minus one"}',
        b'{"generation": -1}',
        b"[]",
        b'{"bundle": {"version": "x"}}',
        b"[" * 5000,
        b'{"generation": 1, "pad": "' + b"x" * MAX_NOTICE_BYTES + b'"}',
    ],
)
def test_malformed_or_oversized_notices_are_refused(payload: bytes) -> None:
    with pytest.raises(NoticeRefused):
        parse_notice(payload)


# --- from paho's thread to the event loop ---


async def test_notices_and_subscription_changes_reach_the_loop_from_another_thread() -> None:
    desired: Latest[device_pb2.DesiredState] = Latest()
    notices = DesiredNotices("dev-1", desired, asyncio.get_running_loop())
    assert notices.topic == desired_topic("dev-1")

    def paho_thread() -> None:
        notices.subscribed()
        notices.received(b"garbage")
        notices.received(notice_payload(state(2)))

    worker = threading.Thread(target=paho_thread)
    worker.start()
    worker.join()
    async with asyncio.timeout(5):
        assert (await desired.get()).generation == 2
    assert notices.listening and notices.moved.is_set()
    assert (notices.received_count, notices.refused_count) == (1, 1)
    notices.moved.clear()
    notices.lost()
    await asyncio.sleep(0)
    assert not notices.listening and notices.moved.is_set()


# --- polling ---


class Stub:
    """GetDesiredState answering from a script: states, or status codes to fail with."""

    def __init__(self, *answers: device_pb2.DesiredState | grpc.StatusCode) -> None:
        self.answers = list(answers)
        self.calls = 0

    async def GetDesiredState(self, request: Any, **_: Any) -> device_pb2.DesiredState:
        self.calls += 1
        answer = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        if isinstance(answer, grpc.StatusCode):
            raise grpc.aio.AioRpcError(answer, grpc.aio.Metadata(), grpc.aio.Metadata(), details="scripted")
        return answer


class Link:
    def __init__(self, stub: Stub) -> None:
        self.stub = stub


class Updater:
    class state:
        applied_generation = 0


async def run_briefly(stub: Stub, notices: DesiredNotices, desired: Latest[Any], seconds: float) -> None:
    task = asyncio.create_task(
        follow_notices(
            Link(stub),  # type: ignore[arg-type]
            Updater(),  # type: ignore[arg-type]
            desired,
            notices,
            every_listening=3600,
            every_deaf=0.05,
        )
    )
    await asyncio.sleep(seconds)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_polls_at_start_and_often_while_the_broker_is_away() -> None:
    desired: Latest[device_pb2.DesiredState] = Latest()
    notices = DesiredNotices("dev-1", desired, asyncio.get_running_loop())
    stub = Stub(state(5))
    await run_briefly(stub, notices, desired, 0.5)
    assert (await desired.get()).generation == 5
    assert stub.calls >= 3  # every ~0.05 s while not subscribed


async def test_polls_once_more_when_the_subscription_is_granted_then_rests(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    desired: Latest[device_pb2.DesiredState] = Latest()
    notices = DesiredNotices("dev-1", desired, asyncio.get_running_loop())
    notices.listening = True
    stub = Stub(state(1))
    task = asyncio.create_task(
        follow_notices(
            Link(stub),  # type: ignore[arg-type]
            Updater(),  # type: ignore[arg-type]
            desired,
            notices,
            every_listening=3600,
            every_deaf=3600,
        )
    )
    await asyncio.sleep(0.1)
    assert stub.calls == 1  # subscribed: the hour-long safety net
    notices._set_listening(False)
    notices._set_listening(True)  # lost and granted again: notices may have been missed
    await asyncio.sleep(0.1)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert stub.calls == 2


async def test_a_revoked_device_stops_following() -> None:
    desired: Latest[device_pb2.DesiredState] = Latest()
    notices = DesiredNotices("dev-1", desired, asyncio.get_running_loop())
    with pytest.raises(DeviceRevoked):
        await follow_notices(
            Link(Stub(grpc.StatusCode.UNAUTHENTICATED)),  # type: ignore[arg-type]
            Updater(),  # type: ignore[arg-type]
            desired,
            notices,
            every_listening=1,
            every_deaf=1,
        )


async def test_an_unreachable_control_plane_is_retried(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(desired_notices, "retrying", _fast_retrying)
    desired: Latest[device_pb2.DesiredState] = Latest()
    notices = DesiredNotices("dev-1", desired, asyncio.get_running_loop())
    stub = Stub(grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNAVAILABLE, state(9))
    await run_briefly(stub, notices, desired, 0.3)
    assert (await desired.get()).generation == 9


def _fast_retrying(max_wait_seconds: float) -> Any:
    from edgefleet.agent.tasks.control import retrying

    return retrying(max_wait_seconds=0.01)


# --- the channel and the control plane's listeners ---


def test_an_idle_channel_lets_its_connection_go_and_sends_no_pings() -> None:
    options = dict(channel_options("127.0.0.1:7444", idle_seconds=300))
    assert options["grpc.client_idle_timeout_ms"] == 300_000
    assert options["grpc.keepalive_permit_without_calls"] == 0
    streaming = dict(channel_options("127.0.0.1:7444"))
    assert "grpc.client_idle_timeout_ms" not in streaming
    assert streaming["grpc.keepalive_permit_without_calls"] == 1
    keys = [k for k, _ in channel_options("127.0.0.1:7444", idle_seconds=300)]
    assert len(keys) == len(set(keys))


def test_committed_changes_reach_listeners_and_wake_streams() -> None:
    notifier = DesiredStateNotifier()
    heard: list[list[str]] = []
    notifier.on_change(heard.append)
    with notifier.subscribe("a") as watch:
        notifier.changed(["a", "b"])
        assert watch.event.is_set()
        watch.event.clear()
        notifier.notify(["a"])  # another replica's change, heard by LISTEN: not announced again
        assert watch.event.is_set()
    assert heard == [["a", "b"]]
