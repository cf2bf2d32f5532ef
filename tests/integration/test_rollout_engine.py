"""The rollout engine through the real control plane: real gRPC, simulated devices speaking the
device protocol (tests/integration/test_rollout_sim.py), inference summaries in the database.

Waves advance one after another, gates stop a bad release at the canary and roll it back, the
operator's controls work, late devices join, a restart resumes without assigning a device twice,
max_concurrent holds, and a config rollout reaches the devices' signed director targets.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from sqlmodel import Session

from edgefleet.controlplane.app.server import RunningControlPlane
from edgefleet.controlplane.store.models import Device
from edgefleet.controlplane.trust.keys import KeyDir
from edgefleet.protos.fleet.v1 import common_pb2, operator_pb2, operator_pb2_grpc
from tests.integration.conftest import OperatorToken, admin_token, public_channel
from tests.integration.test_cp_models import stored_director
from tests.integration.test_rollout_sim import (
    SimFleet,
    deployments,
    eventually,
    models_of,
    push_release,
    rollout,
    rollout_settings,
    start,
    wait_state,
)

pytestmark = pytest.mark.integration

S = operator_pb2
M1, M2 = ("m", 1), ("m", 2)


@pytest.fixture
async def controlplane(tmp_path: Path, keys: KeyDir, mosquitto: str) -> AsyncIterator[RunningControlPlane]:
    running = await start(rollout_settings(tmp_path, keys, mosquitto))
    yield running
    await running.stop(grace=0)


@pytest.fixture
async def fleet(controlplane: RunningControlPlane, tmp_path: Path) -> AsyncIterator[SimFleet]:
    sim = SimFleet(controlplane, tmp_path, speeds={M1: 50.0, M2: 50.0})
    yield sim
    await sim.close()


async def baseline_fleet(
    op: operator_pb2_grpc.OperatorServiceStub,
    channel: grpc.aio.Channel,
    fleet: SimFleet,
    keys: KeyDir,
    tmp_path: Path,
    count: int,
    labels: dict[str, str],
) -> None:
    """``count`` devices with ``labels`` running m@1 (deployed, reported, with summaries), and
    m@2 pushed."""
    token = admin_token(tmp_path)
    await push_release(op, keys, tmp_path, token, "m", 1)
    await push_release(op, keys, tmp_path, token, "m", 2)
    devices = await fleet.enroll(op, channel, count, labels)
    await op.Deploy(
        S.DeployRequest(bundle=common_pb2.BundleRef(name="m", version=1), device_ids=[d.id for d in devices])
    )
    await eventually(lambda: all(d.serving == M1 for d in devices))
    fleet.baseline(M1)


async def updating(op: operator_pb2_grpc.OperatorServiceStub, name: str, n: int) -> bool:
    """Whether exactly ``n`` devices of the rollout are updating."""
    r = await rollout(op, name)
    return sum(d.state == S.ROLLOUT_DEVICE_STATE_UPDATING for d in r.devices) == n


def create_request(name: str, **kwargs: object) -> operator_pb2.CreateRolloutRequest:
    request = S.CreateRolloutRequest(name=name, **kwargs)  # type: ignore[arg-type]
    if not request.WhichOneof("change"):
        request.bundle.CopyFrom(common_pb2.BundleRef(name="m", version=2))
    return request


def percents(*values: float) -> list[operator_pb2.WaveSpec]:
    return [S.WaveSpec(percent=v) for v in values]


def counts(*values: int) -> list[operator_pb2.WaveSpec]:
    return [S.WaveSpec(count=v) for v in values]


GOOD_GATES = S.HealthGates(max_load_failure_rate=0.1, min_tokens_per_second_ratio=0.7, min_requests=5)


async def test_a_good_rollout_completes_wave_by_wave(
    op: operator_pb2_grpc.OperatorServiceStub,
    channel: grpc.aio.Channel,
    fleet: SimFleet,
    controlplane: RunningControlPlane,
    keys: KeyDir,
    tmp_path: Path,
) -> None:
    await baseline_fleet(op, channel, fleet, keys, tmp_path, 20, {"hw": "cpu", "region": "eu"})
    others = await fleet.enroll(op, channel, 2, {"hw": "gpu", "region": "eu"})
    await op.CreateRollout(
        create_request(
            "good", selector={"hw": "cpu"}, waves=percents(1, 10, 50, 100), soak_seconds=1, gates=GOOD_GATES
        )
    )
    seen_updated: list[int] = []

    async def watch() -> bool:
        r = await rollout(op, "good")
        assigned = [d for d in r.devices if d.generation]
        # Never a device of a later wave before the current one passed.
        assert all(d.wave <= r.current_wave for d in assigned), r
        updated = sum(w.healthy for w in r.wave_status)
        if not seen_updated or seen_updated[-1] != updated:
            seen_updated.append(updated)
        return r.state == S.ROLLOUT_STATE_COMPLETED

    await eventually(watch, within=90, every=0.05)
    done = await rollout(op, "good")
    assert [w.devices for w in done.wave_status] == [1, 1, 8, 10]  # cumulative 1, 2, 10, 20
    assert seen_updated[-1] == 20 and {1, 2, 10} <= set(seen_updated), seen_updated
    assert all(w.gate_result.startswith("passed: load failures 0/") for w in done.wave_status)
    assert "tokens/s ratio 1.00" in done.wave_status[0].gate_result
    assert all(d.state == S.ROLLOUT_DEVICE_STATE_HEALTHY for d in done.devices)
    assert all(d.previous_bundle == common_pb2.BundleRef(name="m", version=1) for d in done.devices)
    wave_of = {d.device_id: d.wave for d in done.devices}
    assert all(models_of(controlplane, d) == {"m": 2} for d in wave_of)
    rows = deployments(controlplane)
    assert all(rows[d] == [("m", 1, 1), ("m", 2, 2)] for d in wave_of)  # each assigned once
    assert all(fleet.by_id(d).reports[-1] == (2, common_pb2.DEVICE_STATE_ACTIVE) for d in wave_of)
    for other in others:
        assert other.id not in wave_of and other.id not in rows  # not selected, never touched

    listed = (await op.ListRollouts(S.ListRolloutsRequest())).rollouts
    assert [(r.name, r.state, len(r.devices)) for r in listed] == [("good", S.ROLLOUT_STATE_COMPLETED, 0)]
    assert sum(w.healthy for w in listed[0].wave_status) == 20


async def test_a_release_that_fails_to_load_stops_at_the_canary_and_rolls_back(
    op: operator_pb2_grpc.OperatorServiceStub,
    channel: grpc.aio.Channel,
    fleet: SimFleet,
    controlplane: RunningControlPlane,
    keys: KeyDir,
    tmp_path: Path,
) -> None:
    await baseline_fleet(op, channel, fleet, keys, tmp_path, 10, {"hw": "cpu"})
    fleet.failing.add(M2)
    await op.CreateRollout(
        create_request("broken", waves=percents(10, 100), soak_seconds=1, gates=GOOD_GATES)
    )
    done = await wait_state(op, "broken", S.ROLLOUT_STATE_ROLLED_BACK)
    assert done.reason.startswith("wave 1 of 2 failed its gates: load failures 1/1 (100%) above 10%"), (
        done.reason
    )
    assert done.wave_status[0].gate_result.startswith("failed: load failures 1/1")
    [canary] = [d for d in done.devices if d.wave == 0]
    assert canary.state == S.ROLLOUT_DEVICE_STATE_ROLLED_BACK
    assert canary.reason.startswith(
        "load failure: smoke test failed: m@2 does not load; rolled back at generation 3"
    )
    assert all(
        d.state == S.ROLLOUT_DEVICE_STATE_PENDING and not d.generation for d in done.devices if d.wave == 1
    )
    rows = deployments(controlplane)
    assert rows[canary.device_id] == [("m", 1, 1), ("m", 2, 2), ("m", 1, 3)]
    assert all(r == [("m", 1, 1)] for device_id, r in rows.items() if device_id != canary.device_id)
    assert stored_director(controlplane, canary.device_id).releases == (M1,)
    await eventually(lambda: fleet.by_id(canary.device_id).reports[-1] == (3, common_pb2.DEVICE_STATE_ACTIVE))
    trail = (await op.ListAudit(S.ListAuditRequest(actor="controlplane:rollouts"))).entries
    assert [(e.action, e.outcome) for e in reversed(trail)] == [
        ("rollout.assign", "ok"),
        ("rollout.gate_failed", "failed"),
        ("rollout.devices_rolled_back", "ok"),
    ]


async def test_a_release_whose_tokens_per_second_collapse_is_rolled_back(
    op: operator_pb2_grpc.OperatorServiceStub,
    channel: grpc.aio.Channel,
    fleet: SimFleet,
    controlplane: RunningControlPlane,
    keys: KeyDir,
    tmp_path: Path,
) -> None:
    await baseline_fleet(op, channel, fleet, keys, tmp_path, 10, {"hw": "cpu"})
    fleet.speeds[M2] = 10.0  # 0.2x
    await op.CreateRollout(create_request("slow", waves=percents(10, 100), soak_seconds=1, gates=GOOD_GATES))
    done = await wait_state(op, "slow", S.ROLLOUT_STATE_ROLLED_BACK)
    assert "tokens/s ratio 0.20 below 0.7" in done.reason, done.reason
    assert done.reason.startswith("wave 1 of 2 failed its gates: load failures 0/1 (0%)")
    [canary] = [d for d in done.devices if d.wave == 0]
    assert canary.state == S.ROLLOUT_DEVICE_STATE_ROLLED_BACK
    assert models_of(controlplane, canary.device_id) == {"m": 1}
    assert sum(1 for r in deployments(controlplane).values() if ("m", 2, 2) in r) == 1
    await eventually(lambda: fleet.by_id(canary.device_id).serving == M1)


async def test_pause_resume_abort_and_rollback(
    op: operator_pb2_grpc.OperatorServiceStub,
    channel: grpc.aio.Channel,
    fleet: SimFleet,
    controlplane: RunningControlPlane,
    keys: KeyDir,
    tmp_path: Path,
) -> None:
    await baseline_fleet(op, channel, fleet, keys, tmp_path, 6, {"hw": "cpu"})

    async def control(name: str, action: int) -> operator_pb2.Rollout:
        return await op.ControlRollout(
            S.ControlRolloutRequest(rollout=S.GetRolloutRequest(name=name), action=action)  # type: ignore[arg-type]
        )

    fleet.hold.clear()
    await op.CreateRollout(create_request("paced", waves=counts(2, 6), soak_seconds=0))
    await eventually(lambda: updating(op, "paced", 2))
    paused = await control("paced", S.ROLLOUT_ACTION_PAUSE)
    assert paused.state == S.ROLLOUT_STATE_PAUSED and paused.reason == "paused by operator:admin"
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await control("paced", S.ROLLOUT_ACTION_PAUSE)
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "cannot pause rollout paced: it is paused" in (refused.value.details() or "")

    fleet.hold.set()  # the two updating devices finish while paused...
    await eventually(lambda: updating(op, "paced", 0))
    await asyncio.sleep(1.0)  # ...and nothing else starts
    r = await rollout(op, "paced")
    assert r.state == S.ROLLOUT_STATE_PAUSED
    assert (
        sorted(d.state for d in r.devices)
        == [S.ROLLOUT_DEVICE_STATE_PENDING] * 4 + [S.ROLLOUT_DEVICE_STATE_UPDATED] * 2
    )
    resumed = await control("paced", S.ROLLOUT_ACTION_RESUME)
    assert resumed.state == S.ROLLOUT_STATE_RUNNING and resumed.reason == ""
    await wait_state(op, "paced", S.ROLLOUT_STATE_COMPLETED)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await control("paced", S.ROLLOUT_ACTION_ABORT)
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION

    # Abort: stop for good, devices keep what they have; then roll the aborted rollout back.
    token = admin_token(tmp_path)
    await push_release(op, keys, tmp_path, token, "m", 3)
    fleet.speeds[("m", 3)] = 50.0
    fleet.hold.clear()
    await op.CreateRollout(
        create_request("stopped", bundle=common_pb2.BundleRef(name="m", version=3), waves=counts(1, 6))
    )
    await eventually(lambda: updating(op, "stopped", 1))
    aborted = await control("stopped", S.ROLLOUT_ACTION_ABORT)
    assert aborted.state == S.ROLLOUT_STATE_ABORTED
    fleet.hold.set()
    [first] = [d.device_id for d in aborted.devices if d.generation]
    await eventually(lambda: fleet.by_id(first).serving == ("m", 3))
    await asyncio.sleep(1.0)
    r = await rollout(op, "stopped")
    assert [d.device_id for d in r.devices if d.generation] == [first]  # nobody else started
    assert models_of(controlplane, first) == {"m": 3}
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await control("stopped", S.ROLLOUT_ACTION_RESUME)
    assert "it is aborted" in (refused.value.details() or "")
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await control("stopped", S.ROLLOUT_ACTION_UNSPECIFIED)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT

    rolled = await control("stopped", S.ROLLOUT_ACTION_ROLLBACK)
    assert rolled.state == S.ROLLOUT_STATE_ROLLED_BACK and rolled.reason == "rolled back by operator:admin"
    [back] = [d for d in rolled.devices if d.device_id == first]
    assert back.state == S.ROLLOUT_DEVICE_STATE_ROLLED_BACK
    assert models_of(controlplane, first) == {"m": 2}  # what it ran before this rollout
    await eventually(lambda: fleet.by_id(first).serving == M2)

    audit = (await op.ListAudit(S.ListAuditRequest(action="rollout.rollback"))).entries
    assert [(e.target, e.outcome) for e in audit] == [("stopped", "ok")]
    refusals = (await op.ListAudit(S.ListAuditRequest(action="rollout.pause"))).entries
    assert {e.outcome for e in refusals} == {"ok", "refused"}


async def test_a_device_enrolling_mid_rollout_joins(
    op: operator_pb2_grpc.OperatorServiceStub,
    channel: grpc.aio.Channel,
    fleet: SimFleet,
    controlplane: RunningControlPlane,
    keys: KeyDir,
    tmp_path: Path,
) -> None:
    await baseline_fleet(op, channel, fleet, keys, tmp_path, 4, {"hw": "cpu"})
    fleet.hold.clear()
    await op.CreateRollout(
        create_request("joiners", selector={"hw": "cpu"}, waves=counts(1, 2, 4), soak_seconds=0)
    )
    await eventually(lambda: updating(op, "joiners", 1))  # the canary is updating
    [late] = await fleet.enroll(op, channel, 1, {"hw": "cpu"})
    [stranger] = await fleet.enroll(op, channel, 1, {"hw": "gpu"})

    async def joined() -> bool:
        return any(d.device_id == late.id for d in (await rollout(op, "joiners")).devices)

    await eventually(joined)
    r = await rollout(op, "joiners")
    assert next(d.wave for d in r.devices if d.device_id == late.id) >= 1  # the canary was full
    fleet.hold.set()
    done = await wait_state(op, "joiners", S.ROLLOUT_STATE_COMPLETED)
    assert len(done.devices) == 5 and all(d.state == S.ROLLOUT_DEVICE_STATE_HEALTHY for d in done.devices)
    assert not next(d for d in done.devices if d.device_id == late.id).HasField("previous_bundle")
    assert models_of(controlplane, late.id) == {"m": 2}
    assert models_of(controlplane, stranger.id) == {}
    # It had no m before: its wave passed with it unjudged on ratios, and said so.
    assert any("no baseline" in w.gate_result for w in done.wave_status)


async def test_a_restart_resumes_without_assigning_a_device_twice(
    tmp_path: Path, keys: KeyDir, mosquitto: str
) -> None:
    settings = rollout_settings(tmp_path, keys, mosquitto)
    first = await start(settings)
    fleet = SimFleet(first, tmp_path, speeds={M1: 50.0, M2: 50.0})
    interceptors = [OperatorToken(admin_token(tmp_path))]
    try:
        async with (
            public_channel(first, interceptors=interceptors) as ch,
            public_channel(first) as public,
        ):
            op = operator_pb2_grpc.OperatorServiceStub(ch)
            await baseline_fleet(op, public, fleet, keys, tmp_path, 6, {"hw": "cpu"})
            await op.CreateRollout(create_request("durable", waves=counts(1, 3, 6), soak_seconds=2))

            async def second_wave_started() -> bool:
                r = await rollout(op, "durable")
                return r.current_wave == 1 and any(d.generation for d in r.devices if d.wave == 1)

            await eventually(second_wave_started)
    finally:
        await first.stop(grace=0)

    second = await start(settings)
    try:
        await fleet.reconnect(second)
        async with public_channel(second, interceptors=interceptors) as ch:
            op = operator_pb2_grpc.OperatorServiceStub(ch)
            done = await wait_state(op, "durable", S.ROLLOUT_STATE_COMPLETED)
        assert all(d.state == S.ROLLOUT_DEVICE_STATE_HEALTHY for d in done.devices)
        rows = deployments(second)
        assert sorted(rows) == sorted(d.id for d in fleet.devices)
        for device_id, history in rows.items():
            assert [h for h in history if h[:2] == M2] == [("m", 2, 2)], (device_id, history)
    finally:
        await fleet.close()
        await second.stop(grace=0)


async def test_max_concurrent_is_respected(
    op: operator_pb2_grpc.OperatorServiceStub,
    channel: grpc.aio.Channel,
    fleet: SimFleet,
    keys: KeyDir,
    tmp_path: Path,
) -> None:
    await baseline_fleet(op, channel, fleet, keys, tmp_path, 6, {"hw": "cpu"})
    fleet.apply_delay = 0.6
    await op.CreateRollout(create_request("trickle", max_concurrent=2, soak_seconds=0))
    most = 0

    async def done() -> bool:
        nonlocal most
        r = await rollout(op, "trickle")
        most = max(most, sum(d.state == S.ROLLOUT_DEVICE_STATE_UPDATING for d in r.devices))
        return r.state == S.ROLLOUT_STATE_COMPLETED

    await eventually(done, within=60, every=0.05)
    assert most == 2


async def test_a_config_rollout_reaches_the_signed_targets_and_deploys_keep_it(
    op: operator_pb2_grpc.OperatorServiceStub,
    channel: grpc.aio.Channel,
    fleet: SimFleet,
    controlplane: RunningControlPlane,
    keys: KeyDir,
    tmp_path: Path,
) -> None:
    await baseline_fleet(op, channel, fleet, keys, tmp_path, 3, {"hw": "cpu"})
    config = common_pb2.DeviceConfig(n_threads=2, max_running=2)
    await op.CreateRollout(
        create_request("threads", config=config, waves=counts(1, 3), soak_seconds=1, gates=GOOD_GATES)
    )
    done = await wait_state(op, "threads", S.ROLLOUT_STATE_COMPLETED)
    assert done.HasField("config") and not done.HasField("bundle")
    assert done.config == config
    for device in fleet.devices:
        signed = stored_director(controlplane, device.id)
        assert signed.config == config and signed.releases == (M1,)
        with Session(controlplane.engine) as s:
            row = s.get(Device, device.id)
            assert row is not None and row.config == {"nThreads": 2, "maxRunning": 2}
    # Before/after on the same release: the ratios compared m@1 with itself.
    assert "tokens/s ratio 1.00" in done.wave_status[0].gate_result

    # Every other signer keeps the config: a deploy, a pin.
    target = fleet.devices[0].id
    await op.Deploy(S.DeployRequest(bundle=common_pb2.BundleRef(name="m", version=2), device_ids=[target]))
    assert stored_director(controlplane, target).config == config
    await op.SetVariantPin(S.SetVariantPinRequest(device_id=target, variant_id="gguf-q4_0"))
    signed = stored_director(controlplane, target)
    assert signed.config == config and signed.pin is not None

    # Rolling the config back signs the previous one (none).
    rolled = await op.ControlRollout(
        S.ControlRolloutRequest(rollout=S.GetRolloutRequest(name="threads"), action=S.ROLLOUT_ACTION_ROLLBACK)
    )
    assert all(d.state == S.ROLLOUT_DEVICE_STATE_ROLLED_BACK for d in rolled.devices)
    for device in fleet.devices:
        assert stored_director(controlplane, device.id).config is None
