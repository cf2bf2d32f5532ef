"""Graceful drain of a real control-plane process: on SIGTERM its health turns NOT_SERVING, a
device's open desired-state stream ends at once with UNAVAILABLE (the status agents reconnect
on, to another replica) rather than being held for the grace and cancelled, and the process
exits 0 within the grace."""

from __future__ import annotations

import asyncio
import signal
import sqlite3
import sys
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from edgefleet.agent.device.tls import csr_pem, new_key, store_certificate
from edgefleet.controlplane.app.drain import SHUTTING_DOWN
from edgefleet.controlplane.fleet.rbac import ADMIN_TOKEN_FILE
from edgefleet.controlplane.trust.ca import ca_paths
from edgefleet.controlplane.trust.keys import KeyDir
from edgefleet.protos.fleet.v1 import device_pb2, device_pb2_grpc, operator_pb2, operator_pb2_grpc
from tests.conftest import free_port
from tests.integration.conftest import OperatorToken

pytestmark = pytest.mark.integration

GRACE_S = 30.0
SERVE = """
import asyncio, logging, sys
from pathlib import Path
from edgefleet.controlplane.app.server import serve_forever
from edgefleet.controlplane.app.settings import Settings

logging.basicConfig(level=logging.INFO)
data_dir, listen, device_listen, mqtt_url, keys_dir, grace = sys.argv[1:]
asyncio.run(serve_forever(Settings(
    data_dir=Path(data_dir), listen=listen, device_listen=device_listen, mqtt_url=mqtt_url,
    keys_dir=Path(keys_dir), shutdown_grace_seconds=float(grace),
)))
"""


async def wait_serving(channel: grpc.aio.Channel) -> None:
    """Until the process serves: the health service's Watch, waiting for the port to open."""
    watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(), wait_for_ready=True)
    async with asyncio.timeout(120):
        async for response in watch:
            if response.status == health_pb2.HealthCheckResponse.SERVING:
                watch.cancel()
                return


async def test_sigterm_ends_device_streams_unavailable_and_exits_zero(
    keys: KeyDir, mosquitto: str, tmp_path: Path
) -> None:
    data_dir = tmp_path / "cp"
    port, device_port = free_port(), free_port()
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        SERVE,
        str(data_dir),
        f"127.0.0.1:{port}",
        f"127.0.0.1:{device_port}",
        mosquitto,
        str(keys.path),
        str(GRACE_S),
    )
    try:
        ca_pem = ca_paths(keys.path)[1].read_bytes()
        credentials = grpc.ssl_channel_credentials(ca_pem)
        async with grpc.aio.secure_channel(f"127.0.0.1:{port}", credentials) as public:
            await wait_serving(public)
            token = (data_dir / ADMIN_TOKEN_FILE).read_text().strip()
            async with grpc.aio.secure_channel(
                f"127.0.0.1:{port}", credentials, interceptors=[OperatorToken(token)]
            ) as operator_channel:
                op = operator_pb2_grpc.OperatorServiceStub(operator_channel)
                bootstrap = (await op.CreateToken(operator_pb2.CreateTokenRequest())).token
            key = new_key()
            enrolled = await device_pb2_grpc.DeviceServiceStub(public).Enroll(
                device_pb2.EnrollRequest(bootstrap_token=bootstrap, hostname="t", csr=csr_pem(key, "t"))
            )
        certificate = store_certificate(tmp_path / "device.pem", key, enrolled.certificate)
        # A desired generation, so the stream's first message shows it is open on the server.
        with sqlite3.connect(data_dir / "controlplane.db") as db:
            db.execute("UPDATE device SET desired_generation = 1 WHERE id = ?", (enrolled.device_id,))

        async with grpc.aio.secure_channel(
            f"127.0.0.1:{device_port}", certificate.grpc_credentials(ca_pem)
        ) as device_channel:
            stream = device_pb2_grpc.DeviceServiceStub(device_channel).WatchDesiredState(
                device_pb2.WatchDesiredStateRequest()
            )
            first = await stream.read()
            assert isinstance(first, device_pb2.DesiredState) and first.generation == 1

            process.send_signal(signal.SIGTERM)
            with pytest.raises(grpc.aio.AioRpcError) as ended:
                async with asyncio.timeout(GRACE_S):
                    await stream.read()
            assert ended.value.code() == grpc.StatusCode.UNAVAILABLE
            assert ended.value.details() == SHUTTING_DOWN

        assert await asyncio.wait_for(process.wait(), GRACE_S) == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
