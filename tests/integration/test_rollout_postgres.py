"""Rollout leadership on a real PostgreSQL: of the control planes sharing a database, exactly one
engine drives rollouts (a session-level advisory lock on its own connection), and when it goes
— its connection killed, or the replica stopped — another takes over and no device is assigned
twice."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from sqlalchemy import text

from edgefleet.controlplane.app.server import RunningControlPlane, start_control_plane
from edgefleet.controlplane.rollouts.leader import ROLLOUT_LOCK_KEY, PostgresLeadership
from edgefleet.controlplane.store.engine import make_engine
from edgefleet.controlplane.trust.keys import KeyDir
from edgefleet.protos.fleet.v1 import common_pb2, operator_pb2, operator_pb2_grpc
from tests.integration.conftest import OperatorToken, admin_token, public_channel
from tests.integration.test_rollout_sim import (
    SimFleet,
    deployments,
    eventually,
    push_release,
    rollout_settings,
    wait_state,
)

pytestmark = pytest.mark.integration

S = operator_pb2


async def test_one_leader_at_a_time_and_a_dead_connection_hands_over(postgres_database: str) -> None:
    first_engine, second_engine = make_engine(postgres_database), make_engine(postgres_database)
    first, second = PostgresLeadership(first_engine), PostgresLeadership(second_engine)
    try:
        assert await first.hold()
        assert not await second.hold()
        assert await first.hold()  # re-checking keeps the lead (and does not stack the lock)
        assert not await second.hold()

        # The leader's connection dies (network cut, server-side kill): PostgreSQL releases the lock.
        with first_engine.connect() as conn:
            # A bigint advisory key shows in pg_locks as its high and low 32 bits.
            [pid] = conn.execute(
                text(
                    "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted "
                    "AND database = (SELECT oid FROM pg_database WHERE datname = current_database()) "
                    "AND classid = :high AND objid = :low"
                ),
                {"high": ROLLOUT_LOCK_KEY >> 32, "low": ROLLOUT_LOCK_KEY & 0xFFFFFFFF},
            ).scalars()
            conn.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
        assert not await first.hold()  # notices on its next check
        assert await second.hold()
        assert not await first.hold()

        await second.release()  # a clean shutdown hands over at once
        assert await first.hold()
    finally:
        await first.release()
        await second.release()
        first_engine.dispose()
        second_engine.dispose()


async def test_two_control_planes_on_one_database_drive_a_rollout_once(
    postgres_database: str, keys: KeyDir, mosquitto: str, tmp_path: Path
) -> None:
    settings_a = rollout_settings(tmp_path / "a", keys, mosquitto, db_url=postgres_database)
    settings_b = dataclasses.replace(settings_a, data_dir=tmp_path / "b" / "cp")
    a = await start_control_plane(settings_a, replica_id="a")
    b = await start_control_plane(settings_b, replica_id="b")
    planes: dict[str, RunningControlPlane] = {"a": a, "b": b}
    token = admin_token(tmp_path / "a")  # the database's one admin, written by the first replica
    fleet = SimFleet(a, tmp_path, speeds={("m", 1): 50.0, ("m", 2): 50.0, ("m", 3): 50.0})
    try:
        async with (
            public_channel(a, interceptors=[OperatorToken(token)]) as ch,
            public_channel(a) as public,
        ):
            op = operator_pb2_grpc.OperatorServiceStub(ch)
            for version in (1, 2, 3):
                await push_release(op, keys, tmp_path, token, "m", version)
            devices = await fleet.enroll(op, public, 4, {"hw": "cpu"})
            await op.Deploy(
                S.DeployRequest(
                    bundle=common_pb2.BundleRef(name="m", version=1), device_ids=[d.id for d in devices]
                )
            )
            await eventually(lambda: all(d.serving == ("m", 1) for d in devices))

            await eventually(
                lambda: (
                    a.rollouts is not None
                    and b.rollouts is not None
                    and (a.rollouts.leading or b.rollouts.leading)
                )
            )
            assert a.rollouts is not None and b.rollouts is not None
            leaders = [name for name, plane in planes.items() if plane.rollouts and plane.rollouts.leading]
            assert len(leaders) == 1, leaders
            [leader] = leaders
            standby = "b" if leader == "a" else "a"

            await op.CreateRollout(
                S.CreateRolloutRequest(
                    name="shared",
                    bundle=common_pb2.BundleRef(name="m", version=2),
                    waves=[S.WaveSpec(count=1), S.WaveSpec(count=4)],
                    soak_seconds=0,
                )
            )
            await wait_state(op, "shared", S.ROLLOUT_STATE_COMPLETED)
            standby_engine = planes[standby].rollouts
            assert standby_engine is not None and standby_engine.steps == 0 and not standby_engine.leading
            for history in deployments(a).values():
                assert [h for h in history if h[:2] == ("m", 2)] == [("m", 2, 2)]

        # The leader stops: the standby takes the lead and drives the next rollout.
        await planes.pop(leader).stop(grace=0)
        survivor = planes[standby]
        if leader == "a":
            await fleet.reconnect(survivor)
        await eventually(lambda: survivor.rollouts is not None and survivor.rollouts.leading, within=10)
        async with public_channel(survivor, interceptors=[OperatorToken(token)]) as ch:
            op = operator_pb2_grpc.OperatorServiceStub(ch)
            await op.CreateRollout(
                S.CreateRolloutRequest(name="after", bundle=common_pb2.BundleRef(name="m", version=3))
            )
            await wait_state(op, "after", S.ROLLOUT_STATE_COMPLETED)
        for history in deployments(survivor).values():
            assert [h[:2] for h in history] == [("m", 1), ("m", 2), ("m", 3)]
    finally:
        await fleet.close()
        for plane in planes.values():
            await plane.stop(grace=0)
