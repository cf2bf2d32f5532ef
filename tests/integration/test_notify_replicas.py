"""Changes reach devices through whichever replica they are connected to: two control planes
on one PostgreSQL, a device streaming from B, every change made through A. B's safety net is
set to an hour, so only the NOTIFY that A's transaction commits can wake B's stream in time."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from sqlalchemy import text

from edgefleet.controlplane.app.server import RunningControlPlane, start_control_plane
from edgefleet.controlplane.fleet.changes import ChangeFeed
from edgefleet.controlplane.trust.keys import KeyDir
from edgefleet.protos.fleet.v1 import common_pb2, device_pb2, device_pb2_grpc, operator_pb2, operator_pb2_grpc
from tests.integration.conftest import (
    EnrolledDevice,
    OperatorToken,
    admin_token,
    device_channel,
    enroll_device,
    public_channel,
)
from tests.integration.test_rollout_sim import eventually, push_release, rollout_settings

pytestmark = pytest.mark.integration

WITHIN = 5.0  # the promise is 1 s; the bound is generous so a loaded machine does not fail it
HOUR = 3600.0


@dataclasses.dataclass
class Replicas:
    a: RunningControlPlane
    b: RunningControlPlane
    op: operator_pb2_grpc.OperatorServiceStub  # through A
    token: str
    device: EnrolledDevice  # enrolled through A
    on_b: grpc.aio.Channel  # the device's mutual-TLS channel to B

    def feed(self, plane: RunningControlPlane) -> ChangeFeed:
        assert plane.device_service.feed is not None
        return plane.device_service.feed


@pytest.fixture
async def replicas(
    postgres_database: str, keys: KeyDir, mosquitto: str, tmp_path: Path
) -> AsyncIterator[Replicas]:
    settings_a = dataclasses.replace(
        rollout_settings(tmp_path / "a", keys, mosquitto, db_url=postgres_database),
        desired_state_recheck_seconds=HOUR,
    )
    settings_b = dataclasses.replace(settings_a, data_dir=tmp_path / "b" / "cp")
    a = await start_control_plane(settings_a, replica_id="a")
    b = await start_control_plane(settings_b, replica_id="b")
    token = admin_token(tmp_path / "a")
    try:
        async with (
            public_channel(a, interceptors=[OperatorToken(token)]) as ch,
            public_channel(a) as public,
        ):
            op = operator_pb2_grpc.OperatorServiceStub(ch)
            enroll_token = (await op.CreateToken(operator_pb2.CreateTokenRequest())).token
            device = await enroll_device(a, public, enroll_token, tmp_path)
            async with device_channel(b, device.certificate) as on_b:
                yield Replicas(a, b, op, token, device, on_b)
            await device.channel.close()
    finally:
        await b.stop(grace=0)
        await a.stop(grace=0)


@contextlib.asynccontextmanager
async def stream_on_b(replicas: Replicas) -> AsyncIterator[grpc.aio.UnaryStreamCall]:  # type: ignore[type-arg]
    """The device's desired-state stream from B, once B has registered it."""
    call = device_pb2_grpc.DeviceServiceStub(replicas.on_b).WatchDesiredState(
        device_pb2.WatchDesiredStateRequest()
    )
    try:
        await eventually(
            lambda: replicas.device.id in replicas.b.device_service.notifier.connected(), within=WITHIN
        )
        yield call
    finally:
        call.cancel()


async def deploy_through_a(replicas: Replicas, keys: KeyDir, work: Path, version: int) -> None:
    ref = await push_release(replicas.op, keys, work, replicas.token, "m", version)
    await replicas.op.Deploy(operator_pb2.DeployRequest(bundle=ref, device_ids=[replicas.device.id]))


async def test_a_deploy_through_a_wakes_the_stream_on_b(
    replicas: Replicas, keys: KeyDir, tmp_path: Path
) -> None:
    async with stream_on_b(replicas) as call:
        await deploy_through_a(replicas, keys, tmp_path, 1)
        state = await asyncio.wait_for(call.read(), WITHIN)
        assert state.generation == 1 and state.bundle == common_pb2.BundleRef(name="m", version=1)


async def test_a_revocation_through_a_ends_the_stream_on_b(replicas: Replicas) -> None:
    heard: list[list[str]] = []
    replicas.feed(replicas.b).on_revoked(heard.append)
    async with stream_on_b(replicas) as call:
        await replicas.op.RevokeDevice(operator_pb2.RevokeDeviceRequest(device_id=replicas.device.id))
        with pytest.raises(grpc.aio.AioRpcError) as ended:
            await asyncio.wait_for(call.read(), WITHIN)
        assert ended.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert heard == [[replicas.device.id]]  # B's hooks (its CRL file) hear A's revocation


async def kill_listener(plane: RunningControlPlane, feed: ChangeFeed) -> None:
    with plane.engine.connect() as conn:
        assert conn.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": feed.backend_pid}).scalar()


async def test_the_listener_reconnects_after_its_connection_is_killed(
    replicas: Replicas, keys: KeyDir, tmp_path: Path
) -> None:
    feed = replicas.feed(replicas.b)
    assert feed.connects == 1 and feed.backend_pid is not None
    await kill_listener(replicas.b, feed)
    await eventually(lambda: feed.connects == 2 and feed.listening.is_set(), within=30)
    async with stream_on_b(replicas) as call:
        await deploy_through_a(replicas, keys, tmp_path, 1)
        assert (await asyncio.wait_for(call.read(), WITHIN)).generation == 1


async def test_after_a_reconnect_every_stream_is_rechecked(replicas: Replicas) -> None:
    """A change whose notice B never heard (committed here without one, as one sent while B
    was reconnecting would be lost) reaches B's stream once B listens again: B re-checks every
    connected stream after each connect."""
    feed = replicas.feed(replicas.b)
    async with stream_on_b(replicas) as call:
        with replicas.a.engine.begin() as conn:
            conn.execute(
                text("UPDATE device SET desired_generation = desired_generation + 1 WHERE id = :id"),
                {"id": replicas.device.id},
            )
        read = asyncio.ensure_future(call.read())
        done, _ = await asyncio.wait([read], timeout=1.0)
        assert not done, "nothing should have told B yet"
        await kill_listener(replicas.b, feed)
        assert (await asyncio.wait_for(read, 30)).generation == 1
        assert feed.connects == 2


async def test_a_bulk_notice_wakes_only_the_streams_behind(replicas: Replicas) -> None:
    """``*`` (a change too large to list) costs B one query and wakes its stale streams."""
    async with stream_on_b(replicas) as call:
        with replicas.a.engine.begin() as conn:
            conn.execute(
                text("UPDATE device SET desired_generation = desired_generation + 1 WHERE id = :id"),
                {"id": replicas.device.id},
            )
            conn.execute(text("SELECT pg_notify('edgefleet_desired_state', '*')"))
        assert (await asyncio.wait_for(call.read(), WITHIN)).generation == 1
