"""Devices on MQTT with their certificates, through the control plane and a real Mosquitto
running deploy/mosquitto's configuration: telemetry flows, and revocation ends it."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import grpc
import pytest
from sqlalchemy import func, select
from sqlmodel import Session, col

from edgefleet.agent.device.tls import broker_tls_context
from edgefleet.agent.telemetry.outbox import Outbox
from edgefleet.agent.telemetry.publisher import TelemetryPublisher
from edgefleet.agent.telemetry.recorder import Telemetry
from edgefleet.controlplane.app.server import RunningControlPlane, start_control_plane
from edgefleet.controlplane.app.settings import Settings
from edgefleet.controlplane.store.models import TelemetryRecord
from edgefleet.controlplane.trust.ca import load_ca
from edgefleet.controlplane.trust.keys import KeyDir
from edgefleet.protos.fleet.v1 import common_pb2, device_pb2, operator_pb2, operator_pb2_grpc
from tests.integration.conftest import OperatorToken, admin_token, enroll_device, public_channel
from tests.mqtt_tls import TlsBroker, start_tls_broker

pytestmark = pytest.mark.integration


@pytest.fixture
def tls_broker(tmp_path: Path, keys: KeyDir) -> Iterator[TlsBroker]:
    ca = load_ca(keys.path)
    assert ca is not None
    broker = start_tls_broker(tmp_path / "broker", ca=ca)
    yield broker
    broker.stop()


@pytest.fixture
async def cp(tmp_path: Path, keys: KeyDir, tls_broker: TlsBroker) -> AsyncIterator[RunningControlPlane]:
    settings = Settings(
        data_dir=tmp_path / "cp",
        listen="127.0.0.1:0",
        device_listen="127.0.0.1:0",
        mqtt_url=tls_broker.controlplane_url,
        mqtt_advertise_url=tls_broker.device_url,
        crl_file=tls_broker.crl_path,  # the broker's crlfile: written by the control plane
        keys_dir=keys.path,
    )
    running = await start_control_plane(settings)
    yield running
    await running.stop(grace=0)


def stored(cp: RunningControlPlane, device_id: str) -> int:
    with Session(cp.engine) as s:
        rows = select(func.count()).select_from(TelemetryRecord)
        return int(s.execute(rows.where(col(TelemetryRecord.device_id) == device_id)).scalar_one())


async def eventually(predicate: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + 15.0
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


def heartbeat(telemetry: Telemetry) -> None:
    telemetry.record_heartbeat(
        state=common_pb2.DEVICE_STATE_IDLE,
        active_bundle=None,
        api_url="",
        rss_bytes=1,
        uptime_seconds=1.0,
        requests_total=0,
        variant="",
    )


async def test_a_device_publishes_with_its_certificate_until_it_is_revoked(
    cp: RunningControlPlane, tls_broker: TlsBroker, tmp_path: Path
) -> None:
    interceptors = [OperatorToken(admin_token(tmp_path))]
    async with public_channel(cp, interceptors=interceptors) as op_channel, public_channel(cp) as channel:
        op = operator_pb2_grpc.OperatorServiceStub(op_channel)
        token = (await op.CreateToken(operator_pb2.CreateTokenRequest())).token
        device = await enroll_device(cp, channel, token, tmp_path)
        assert device.response.mqtt_url == tls_broker.device_url

        outbox = Outbox(tmp_path / "outbox.sqlite")
        publisher = TelemetryPublisher(
            device_id=device.id,
            broker_url=device.response.mqtt_url,
            outbox=outbox,
            tls_context=broker_tls_context(cp.ca_pem, device.certificate),
        )
        telemetry = Telemetry(device_id=device.id, outbox=outbox, nudge=publisher.nudge)
        publisher.start()
        try:
            heartbeat(telemetry)
            await eventually(lambda: stored(cp, device.id) == 1, "the heartbeat in the database")

            revoked_at = time.monotonic()
            assert (await op.RevokeDevice(operator_pb2.RevokeDeviceRequest(device_id=device.id))).revoked
            revoke_call_ms = (time.monotonic() - revoked_at) * 1000
            tls_broker.reload()  # what deploy/systemd's CRL path unit does when the file changes
            await eventually(lambda: not publisher.connected, "the broker to drop the revoked device")
            cut_ms = (time.monotonic() - revoked_at) * 1000
            print(
                f"\nrevocation: RevokeDevice returned in {revoke_call_ms:.0f} ms (CRL + session takeover); "
                f"the device's MQTT connection was gone {cut_ms:.0f} ms after the call began"
            )
            heartbeat(telemetry)
            await asyncio.sleep(4)  # past paho's reconnect delay and the second takeover
            assert not publisher.connected
            assert stored(cp, device.id) == 1
            log = tls_broker.log_text()
            assert f"Client {device.id} already connected, closing old connection" in log  # takeover
            assert "certificate verify failed" in log.split("Reloading config.")[-1]  # CRL on reconnect
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await device.stub.ReportStatus(device_pb2.StatusReport(), timeout=5)
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        finally:
            await asyncio.to_thread(publisher.stop)
            outbox.close()
            await device.channel.close()
