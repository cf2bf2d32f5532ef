"""The simulated fleet spread over worker processes (bench/sim_pool.py) against a real control
plane: devices in two spawned processes enroll, hold their streams over mutual TLS (or listen
for notices on the broker) and report,
and what the pool says it waited for is what the control plane stores."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.sim_fleet import build_sim_bundle
from bench.sim_pool import FleetPool, FleetSpec, FleetWorkerError
from edgefleet.controlplane.app.server import RunningControlPlane
from edgefleet.controlplane.cli.client import operator_stub, publish_bundle
from edgefleet.controlplane.trust.keys import KeyDir
from edgefleet.protos.fleet.v1 import common_pb2, operator_pb2, operator_pb2_grpc
from tests.conftest import start_broker
from tests.integration.conftest import admin_token

pytestmark = pytest.mark.integration

SIZE = 12
WITHIN_S = 60.0


@pytest.fixture(scope="module")
def mosquitto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    broker = start_broker(tmp_path_factory.mktemp("sim-pool-broker"))
    yield broker.url
    broker.stop()


@pytest.mark.parametrize("notices", [False, True], ids=["stream", "broker-notices"])
async def test_devices_in_two_workers_enroll_receive_and_report(
    controlplane: RunningControlPlane,
    op: operator_pb2_grpc.OperatorServiceStub,
    keys: KeyDir,
    tmp_path: Path,
    notices: bool,
) -> None:
    """With ``notices`` each device hears of the deploy on its own MQTT connection (the
    control plane's broker, which it named at enrollment) instead of a stream."""
    bundle = build_sim_bundle(tmp_path / "bundles", keys.release_signers())
    channel, stub = operator_stub(
        f"127.0.0.1:{controlplane.port}", admin_token(tmp_path), ca_pem=controlplane.ca_pem
    )
    with channel:
        release = (await asyncio.to_thread(publish_bundle, stub, bundle.path, keys.release_signers())).bundle
    token = (await op.CreateToken(operator_pb2.CreateTokenRequest(uses=SIZE))).token
    spec = FleetSpec(
        target=f"127.0.0.1:{controlplane.port}",
        device_target=f"127.0.0.1:{controlplane.device_port}",
        ca_pem=controlplane.ca_pem,
        token=token,
        size=SIZE,
        notices=notices,
    )
    async with FleetPool(spec, workers=2) as pool:
        assert pool.shares == [SIZE // 2, SIZE // 2] and len(pool.pids) == 2
        assert await pool.enroll() > 0
        await pool.connect()
        listed = (await op.ListDevices(operator_pb2.ListDevicesRequest())).devices
        assert len(listed) == SIZE

        await pool.arm()
        started = time.monotonic()
        deployed = await op.Deploy(operator_pb2.DeployRequest(bundle=release, all_devices=True))
        received = await pool.wait("generation", WITHIN_S, since=started)
        reported = await pool.wait("reported", WITHIN_S, since=started)
        assert 0.0 <= received <= reported < WITHIN_S

        for device in (await op.ListDevices(operator_pb2.ListDevicesRequest())).devices:
            assert device.state == common_pb2.DEVICE_STATE_ACTIVE
            assert device.applied_generation == deployed.max_generation
        assert all(s.cpu_s > 0 and s.rss_mib > 0 for s in await pool.stats())

        # Nothing new to receive: a wait times out, and the worker's error reaches the caller.
        await pool.arm()
        with pytest.raises(FleetWorkerError, match="TimeoutError"):
            await pool.wait("generation", 0.5, since=time.monotonic())
    assert pool.pids == []  # every worker joined
