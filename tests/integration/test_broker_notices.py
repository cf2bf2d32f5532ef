"""Desired-state notices over the broker, end to end on real parts: a control plane in this
process with a real Mosquitto and SQLite, and the agent's own listener (DesiredNotices) on the
agent's own MQTT connection (TelemetryPublisher) for an enrolled device.

A deploy reaches the device as a notice on its desired topic, GetDesiredState answers the same
generation, a revoked device is refused by GetDesiredState, and a device hears only its own
notices."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc
import pytest

from edgefleet.agent.tasks.control import DeviceRevoked
from edgefleet.agent.tasks.desired_notices import DesiredNotices, ask_desired
from edgefleet.agent.telemetry.outbox_open import open_outbox
from edgefleet.agent.telemetry.publisher import TelemetryPublisher
from edgefleet.agent.update.latest import Latest
from edgefleet.controlplane.app.server import RunningControlPlane
from edgefleet.controlplane.build.bundles import BundleOnDisk
from edgefleet.controlplane.cli.demo import free_port
from edgefleet.controlplane.fleet.broker_notices import BrokerNotices
from edgefleet.controlplane.trust.keys import KeyDir
from edgefleet.protos.fleet.v1 import device_pb2, operator_pb2, operator_pb2_grpc
from tests.integration.conftest import EnrolledDevice, admin_token, enroll_device
from tests.integration.test_controlplane_grpc import push

pytestmark = pytest.mark.integration

WITHIN_S = 15.0


class Link:
    """What follow_notices needs of a DeviceLink: the device's stub."""

    def __init__(self, device: EnrolledDevice) -> None:
        self.stub = device.stub


@contextmanager
def listening(
    device: EnrolledDevice, broker_url: str, work: Path, loop: asyncio.AbstractEventLoop
) -> Iterator[tuple[DesiredNotices, Latest[device_pb2.DesiredState]]]:
    """The agent's MQTT connection for ``device`` with its desired-state listener."""
    desired: Latest[device_pb2.DesiredState] = Latest()
    notices = DesiredNotices(device.id, desired, loop)
    opened = open_outbox(work / f"{device.id}-outbox.db")
    publisher = TelemetryPublisher(
        device_id=device.id, broker_url=broker_url, outbox=opened.outbox, listener=notices
    )
    publisher.start()
    try:
        yield notices, desired
    finally:
        publisher.stop(timeout=2)
        opened.outbox.close()


async def until_listening(notices: DesiredNotices) -> None:
    async with asyncio.timeout(WITHIN_S):
        while not notices.listening:
            notices.moved.clear()
            await notices.moved.wait()


@pytest.fixture
async def pushed(
    op: operator_pb2_grpc.OperatorServiceStub, smollm2_bundle: BundleOnDisk, keys: KeyDir, tmp_path: Path
) -> operator_pb2.PushBundleResponse:
    return await push(op, smollm2_bundle.path, keys.release_signers(), admin_token(tmp_path))


async def test_a_deploy_reaches_the_device_as_a_notice_and_the_poll_agrees(
    controlplane: RunningControlPlane,
    op: operator_pb2_grpc.OperatorServiceStub,
    enrolled: EnrolledDevice,
    pushed: operator_pb2.PushBundleResponse,
    tmp_path: Path,
) -> None:
    link = Link(enrolled)
    assert (await ask_desired(link, 0)).generation == 0  # type: ignore[arg-type]
    with listening(enrolled, controlplane.mqtt_url, tmp_path, asyncio.get_running_loop()) as (
        notices,
        desired,
    ):
        await until_listening(notices)
        await op.Deploy(operator_pb2.DeployRequest(bundle=pushed.bundle, device_ids=[enrolled.id]))
        async with asyncio.timeout(WITHIN_S):
            heard = await desired.get()
    assert heard.generation == 1
    assert (heard.bundle.name, heard.bundle.version) == ("smollm2", 1)
    assert notices.refused_count == 0
    polled = await ask_desired(link, 0)  # type: ignore[arg-type]
    assert polled == heard


async def test_a_device_hears_only_its_own_notices(
    controlplane: RunningControlPlane,
    op: operator_pb2_grpc.OperatorServiceStub,
    channel: grpc.aio.Channel,
    enrolled: EnrolledDevice,
    pushed: operator_pb2.PushBundleResponse,
    tmp_path: Path,
) -> None:
    token = (await op.CreateToken(operator_pb2.CreateTokenRequest())).token
    other = await enroll_device(controlplane, channel, token, tmp_path)
    loop = asyncio.get_running_loop()
    with (
        listening(enrolled, controlplane.mqtt_url, tmp_path, loop) as (mine, my_desired),
        listening(other, controlplane.mqtt_url, tmp_path, loop) as (theirs, their_desired),
    ):
        await until_listening(mine)
        await until_listening(theirs)
        await op.Deploy(operator_pb2.DeployRequest(bundle=pushed.bundle, device_ids=[other.id]))
        async with asyncio.timeout(WITHIN_S):
            assert (await their_desired.get()).generation == 1
        # The notices left in commit order on one connection: the other device's came first, so
        # one of ours would have arrived by now.
        await op.Deploy(operator_pb2.DeployRequest(bundle=pushed.bundle, device_ids=[enrolled.id]))
        async with asyncio.timeout(WITHIN_S):
            assert (await my_desired.get()).generation == 1
    assert (mine.received_count, theirs.received_count) == (1, 1)
    await other.channel.close()


async def test_a_revoked_device_is_refused_by_the_poll(
    controlplane: RunningControlPlane,
    op: operator_pb2_grpc.OperatorServiceStub,
    enrolled: EnrolledDevice,
) -> None:
    await op.RevokeDevice(operator_pb2.RevokeDeviceRequest(device_id=enrolled.id))
    with pytest.raises(DeviceRevoked):
        await ask_desired(Link(enrolled), 0)  # type: ignore[arg-type]


async def test_announcements_while_the_broker_is_away_are_dropped_and_counted(
    controlplane: RunningControlPlane, enrolled: EnrolledDevice
) -> None:
    """Nothing is queued for a broker that is away (an outage must not grow memory); the
    devices poll instead."""
    away = BrokerNotices(
        db=controlplane.device_service.db, broker_url=f"mqtt://127.0.0.1:{free_port()}", client_id="t-notices"
    )
    away.start()
    try:
        away.announce([enrolled.id])
        await away.idle()
        assert (away.announced, away.dropped) == (0, 1)
    finally:
        await away.stop()
