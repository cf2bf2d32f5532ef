"""Batched desired-state delivery: the streams a deploy wakes read their states together in
read-only queries, each still gets every generation, and a revoked device's stream ends at
once; the read-only path takes no SQLite write lock and cannot write."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path

import grpc
import pytest
from sqlalchemy import text
from sqlalchemy.exc import OperationalError

from bench.sim_bundle import build_sim_bundle
from edgefleet.controlplane.app.server import RunningControlPlane
from edgefleet.controlplane.fleet.desired_state import desired_states
from edgefleet.controlplane.store import devices
from edgefleet.controlplane.store.database import Database
from edgefleet.controlplane.store.engine import make_engine
from edgefleet.controlplane.store.models import Bundle, Device, utcnow
from edgefleet.controlplane.trust.keys import KeyDir
from edgefleet.protos.fleet.v1 import device_pb2, operator_pb2, operator_pb2_grpc
from tests.integration.conftest import EnrolledDevice, admin_token, enroll_device
from tests.integration.test_controlplane_grpc import push

pytestmark = pytest.mark.integration

FLEET = 12
DEADLINE_S = 30.0  # a bound on waiting for each stream's next message, not a measurement


async def eventually(check: Callable[[], bool]) -> None:
    """Polls ``check`` until it holds, for at most DEADLINE_S."""
    deadline = asyncio.get_running_loop().time() + DEADLINE_S
    while True:
        if check():
            return
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


async def test_a_deploy_wakes_many_streams_and_they_read_together(
    controlplane: RunningControlPlane,
    channel: grpc.aio.Channel,
    op: operator_pb2_grpc.OperatorServiceStub,
    keys: KeyDir,
    tmp_path: Path,
) -> None:
    token = (await op.CreateToken(operator_pb2.CreateTokenRequest(uses=FLEET))).token
    fleet: list[EnrolledDevice] = [
        await enroll_device(controlplane, channel, token, tmp_path) for _ in range(FLEET)
    ]
    streams = [d.stub.WatchDesiredState(device_pb2.WatchDesiredStateRequest()) for d in fleet]
    batch = controlplane.device_service.desired
    notifier = controlplane.device_service.notifier
    await eventually(lambda: len(notifier.connected()) == FLEET and batch.idle)  # all read once

    bundles = tmp_path / "bundles"
    v1 = await push(
        op,
        build_sim_bundle(bundles, keys.release_signers()).path,
        keys.release_signers(),
        admin_token(tmp_path),
    )
    before = batch.fetches
    await op.Deploy(operator_pb2.DeployRequest(bundle=v1.bundle, device_ids=[d.id for d in fleet]))
    first = [await asyncio.wait_for(s.read(), DEADLINE_S) for s in streams]
    assert [(s.generation, s.bundle.name, s.bundle.version) for s in first] == [(1, "simlm", 1)] * FLEET
    assert batch.fetches - before < FLEET, "every woken stream read its state on its own"
    assert batch.largest > 1

    # A revoked device's stream ends at once; the others get the next generation.
    revoked, *kept = fleet
    assert (await op.RevokeDevice(operator_pb2.RevokeDeviceRequest(device_id=revoked.id))).revoked
    with pytest.raises(grpc.aio.AioRpcError) as ended:
        await asyncio.wait_for(streams[0].read(), DEADLINE_S)
    assert ended.value.code() == grpc.StatusCode.UNAUTHENTICATED
    v2 = await push(
        op,
        build_sim_bundle(bundles, keys.release_signers(), version=2).path,
        keys.release_signers(),
        admin_token(tmp_path),
    )
    await op.Deploy(operator_pb2.DeployRequest(bundle=v2.bundle, device_ids=[d.id for d in kept]))
    second = [await asyncio.wait_for(s.read(), DEADLINE_S) for s in streams[1:]]
    assert [(s.generation, s.bundle.version) for s in second] == [(2, 2)] * len(kept)
    for stream in streams[1:]:
        stream.cancel()
    for device in fleet:
        await device.channel.close()


@pytest.fixture(params=["sqlite", "postgresql"])
def database(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Database]:
    url = (
        f"sqlite:///{tmp_path / 'cp.sqlite3'}"
        if request.param == "sqlite"
        else request.getfixturevalue("postgres_database")
    )
    engine = make_engine(url)
    db = Database(engine)
    yield db
    db.dispose()
    engine.dispose()


def add_fleet(db: Database) -> None:
    """d-new (never assigned), d-one (generation 3 of bundle m@2), d-gone (revoked)."""

    def add(session: devices.Session) -> None:
        bundle = Bundle(
            name="m",
            version=2,
            release_metadata=b"{}",
            manifest_json="{}",
            expires_at=utcnow() + timedelta(days=1),
        )
        session.add(bundle)
        session.flush()
        for device_id in ("d-new", "d-one", "d-gone"):
            devices.create_device(session, device_id=device_id, hostname="h", labels={})
        one = session.get(Device, "d-one")
        gone = session.get(Device, "d-gone")
        assert one is not None and gone is not None
        one.desired_generation, one.desired_bundle_id = 3, bundle.id
        gone.desired_generation, gone.revoked_at = 1, utcnow()

    db.run_sync(add)


async def test_states_read_in_one_go_leave_out_revoked_and_removed_devices(database: Database) -> None:
    add_fleet(database)
    states = await database.read(lambda s: desired_states(s, ["d-new", "d-one", "d-gone", "d-never"]))
    assert sorted(states) == ["d-new", "d-one"]
    assert states["d-new"] == device_pb2.DesiredState(generation=0)
    assert (states["d-one"].generation, states["d-one"].bundle.name, states["d-one"].bundle.version) == (
        3,
        "m",
        2,
    )


def test_sqlite_reads_beside_a_writer_holding_the_lock_and_cannot_write(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'cp.sqlite3'}")
    db = Database(engine)
    try:
        add_fleet(db)
        with engine.connect() as writer:
            writer.execute(text("UPDATE device SET desired_generation = 9 WHERE id = 'd-one'"))
            # The writer holds SQLite's write lock (BEGIN IMMEDIATE) and has not committed: a
            # read that wanted the lock would wait for it; this one reads the committed state.
            assert db.read_sync(lambda s: devices.desired_rows(s, ["d-one"]))["d-one"].generation == 3
            writer.rollback()
        with pytest.raises(OperationalError, match="readonly"):
            db.read_sync(lambda s: s.execute(text("UPDATE device SET hostname = 'x'")))
    finally:
        db.dispose()
        engine.dispose()
