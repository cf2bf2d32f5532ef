"""The simulated fleet (bench/sim_fleet.py) against a real control plane: 50 devices speaking
the device protocol over real mutual TLS, telemetry through a real Mosquitto into SQLite.

These check the simulator itself, so the fan-out benchmark and rollout tests can trust what
it reports: deliveries it counts really happened, outcomes it reports are what the control
plane stores, and its telemetry takes the path agents' telemetry takes.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import pytest

from bench.sim_fleet import Behaviour, SimFleet, build_sim_bundle
from edgefleet.controlplane.app.server import RunningControlPlane
from edgefleet.controlplane.cli.client import operator_stub, publish_bundle
from edgefleet.controlplane.trust.keys import KeyDir
from edgefleet.protos.fleet.v1 import common_pb2, operator_pb2, operator_pb2_grpc
from tests.conftest import start_broker
from tests.integration.conftest import admin_token

pytestmark = pytest.mark.integration

SIZE = 50


@pytest.fixture(scope="module")
def mosquitto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A broker of this module's own: ingestors that other tests stopped keep persistent sessions
    in the control plane's shared-subscription group on the session-wide broker, and the broker
    would queue part of this module's telemetry for them."""
    broker = start_broker(tmp_path_factory.mktemp("sim-fleet-broker"))
    yield broker.url
    broker.stop()


@pytest.fixture
async def release(controlplane: RunningControlPlane, keys: KeyDir, tmp_path: Path) -> common_pb2.BundleRef:
    """A tiny signed release, pushed the way `fleetctl bundle push` pushes (in a thread: the
    client is blocking and the control plane runs on this loop)."""
    bundle = build_sim_bundle(tmp_path / "bundles", keys.release_signers())
    channel, stub = operator_stub(
        f"127.0.0.1:{controlplane.port}", admin_token(tmp_path), ca_pem=controlplane.ca_pem
    )
    with channel:
        pushed = await asyncio.to_thread(publish_bundle, stub, bundle.path, keys.release_signers())
    return pushed.bundle


@pytest.fixture
async def fleet(
    controlplane: RunningControlPlane, op: operator_pb2_grpc.OperatorServiceStub
) -> AsyncIterator[SimFleet]:
    token = (await op.CreateToken(operator_pb2.CreateTokenRequest(uses=SIZE))).token
    async with SimFleet(
        target=f"127.0.0.1:{controlplane.port}",
        device_target=f"127.0.0.1:{controlplane.device_port}",
        ca_pem=controlplane.ca_pem,
        token=token,
        size=SIZE,
        labels=lambda i: {"ring": "canary" if i < 5 else "main"},
    ) as sim:
        yield sim


async def devices(op: operator_pb2_grpc.OperatorServiceStub) -> dict[str, common_pb2.DeviceSummary]:
    return {d.device_id: d for d in (await op.ListDevices(operator_pb2.ListDevicesRequest())).devices}


async def eventually(probe: Callable[[], Awaitable[bool]], within: float, what: str) -> None:
    """Polls an async ``probe`` until it returns something true."""
    deadline = asyncio.get_running_loop().time() + within
    while not await probe():
        assert asyncio.get_running_loop().time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.2)


async def test_deploy_reaches_every_device(
    fleet: SimFleet, op: operator_pb2_grpc.OperatorServiceStub, release: common_pb2.BundleRef
) -> None:
    listed = await devices(op)
    assert set(listed) == {d.device_id for d in fleet.devices}
    assert {d.labels["ring"] for d in listed.values()} == {"canary", "main"}

    deployed = await op.Deploy(operator_pb2.DeployRequest(bundle=release, all_devices=True))
    assert len(deployed.device_ids) == SIZE
    seconds = await fleet.wait_generation(deployed.max_generation, 30)
    assert 0.0 <= seconds < 30
    assert all(d.generation == deployed.max_generation for d in fleet.devices)
    await fleet.wait_reported(deployed.max_generation, 30)

    for summary in (await devices(op)).values():
        assert summary.state == common_pb2.DEVICE_STATE_ACTIVE
        assert (summary.active_bundle.name, summary.active_bundle.version) == (release.name, release.version)
        assert summary.applied_generation == summary.desired_generation == deployed.max_generation
        assert [(m.bundle.name, m.variant) for m in summary.models] == [(release.name, "sim")]
        assert summary.api_url.endswith(".sim.invalid:8080")


async def test_failed_behaviour_is_reported_and_listed(
    fleet: SimFleet, op: operator_pb2_grpc.OperatorServiceStub, release: common_pb2.BundleRef
) -> None:
    ref = f"{release.name}@{release.version}"
    failing = {d.device_id for d in fleet.devices[:3]}
    for device_id in failing:
        fleet.set_behaviour(device_id, Behaviour.failing(ref, error_kind="RuntimeLoadFailed"))
    slow = fleet.devices[3].device_id
    fleet.set_behaviour(slow, Behaviour(delay_s=0.5))

    deployed = await op.Deploy(operator_pb2.DeployRequest(bundle=release, all_devices=True))
    await fleet.wait_reported(deployed.max_generation, 30)
    assert fleet.device(slow).reported_at - fleet.device(slow).received_at >= 0.5

    listed = await devices(op)
    for device_id, summary in listed.items():
        if device_id in failing:
            assert summary.state == common_pb2.DEVICE_STATE_FAILED
            assert ref in summary.last_error and "smoke test" in summary.last_error
            assert summary.applied_generation == 0  # a refusal applies nothing
            assert not summary.HasField("active_bundle") or not summary.active_bundle.name
        else:
            assert summary.state == common_pb2.DEVICE_STATE_ACTIVE
            assert summary.applied_generation == deployed.max_generation
    refused = await op.ListAudit(operator_pb2.ListAuditRequest(action="deployment.refused"))
    assert {e.actor.removeprefix("device:") for e in refused.entries} == failing
    assert all(json.loads(e.detail_json)["kind"] == "RuntimeLoadFailed" for e in refused.entries)


async def test_telemetry_reaches_the_database(
    fleet: SimFleet, op: operator_pb2_grpc.OperatorServiceStub, release: common_pb2.BundleRef
) -> None:
    deployed = await op.Deploy(operator_pb2.DeployRequest(bundle=release, all_devices=True))
    await fleet.wait_reported(deployed.max_generation, 30)

    published = await fleet.publish_inference(tokens_per_second=42.5, latency_ms=180.0, requests=12)
    assert published == SIZE
    ref = f"{release.name}@{release.version}"
    assert await fleet.publish_inference(tokens_per_second=1.0, latency_ms=1.0, release=f"{ref}0") == 0

    async def stored() -> bool:
        listed = await devices(op)
        return all(d.last_tokens_per_second == 42.5 and d.last_latency_ms == 180.0 for d in listed.values())

    await eventually(stored, 30, "every device's inference figures in ListDevices")
    rows = (await op.QueryTelemetry(operator_pb2.QueryTelemetryRequest(kind="inference", limit=500))).rows
    assert len(rows) == SIZE
    assert {r.device_id for r in rows} == {d.device_id for d in fleet.devices}
    payload = json.loads(rows[0].payload_json)
    assert payload["bundle"] == {"name": release.name, "version": str(release.version)}
    assert payload["requests"] == "12" and payload["tokensPerSecond"] == 42.5
