"""The embedded broker refuses a revoked device's certificate: the real control plane with its
embedded broker, a device enrolled over gRPC, revoked by an operator over gRPC, reconnecting
over real TLS with the same, still unexpired certificate; and a CRL that cannot be trusted
admits nobody."""

from __future__ import annotations

import queue
import threading
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import grpc
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from edgefleet.agent.device.tls import broker_tls_context
from edgefleet.controlplane.app.server import RunningControlPlane, start_control_plane
from edgefleet.controlplane.app.settings import Settings
from edgefleet.controlplane.trust.keys import KeyDir
from edgefleet.protos.fleet.broker_url import configure_client, parse_broker_url
from edgefleet.protos.fleet.v1 import operator_pb2, operator_pb2_grpc
from tests.integration.conftest import EnrolledDevice, enroll_device

pytestmark = pytest.mark.integration

ACCEPTED = 0
NOT_AUTHORIZED = 135  # paho reports 3.1.1's CONNACK 5 as v5's "not authorized"
WAIT_S = 15.0


@pytest.fixture
async def controlplane(tmp_path: Path, keys: KeyDir) -> AsyncIterator[RunningControlPlane]:
    """The control plane with its embedded broker (no MQTT URL given)."""
    settings = Settings(
        data_dir=tmp_path / "cp", listen="127.0.0.1:0", device_listen="127.0.0.1:0", keys_dir=keys.path
    )
    running = await start_control_plane(settings)
    yield running
    await running.stop(grace=0)


class DeviceConnection:
    """One MQTT connection made with a device's certificate, as its agent makes it."""

    def __init__(self, running: RunningControlPlane, device: EnrolledDevice) -> None:
        assert running.broker is not None and running.broker.device_url is not None
        address = parse_broker_url(running.broker.device_url)
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=device.id,
            protocol=MQTTProtocolVersion.MQTTv311,
            clean_session=True,
            reconnect_on_failure=False,
        )
        configure_client(self.client, address, broker_tls_context(running.ca_pem, device.certificate))
        self.connack: queue.Queue[int] = queue.Queue()
        self.gone = threading.Event()
        self.client.on_connect = lambda _c, _u, _f, rc, _p: self.connack.put(rc.value)
        self.client.on_disconnect = lambda *_: self.gone.set()
        self.client.connect(address.host, address.port)
        self.client.loop_start()
        self.code = self.connack.get(timeout=WAIT_S)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


async def enroll(
    running: RunningControlPlane,
    op: operator_pb2_grpc.OperatorServiceStub,
    channel: grpc.aio.Channel,
    tmp_path: Path,
) -> EnrolledDevice:
    token = (await op.CreateToken(operator_pb2.CreateTokenRequest())).token
    return await enroll_device(running, channel, token, tmp_path)


async def test_a_revoked_device_cannot_reconnect_with_its_certificate(
    controlplane: RunningControlPlane,
    op: operator_pb2_grpc.OperatorServiceStub,
    channel: grpc.aio.Channel,
    tmp_path: Path,
) -> None:
    kept = await enroll(controlplane, op, channel, tmp_path)
    revoked = await enroll(controlplane, op, channel, tmp_path)
    before = DeviceConnection(controlplane, revoked)
    try:
        assert before.code == ACCEPTED
        response = await op.RevokeDevice(operator_pb2.RevokeDeviceRequest(device_id=revoked.id))
        assert response.revoked
        assert before.gone.wait(WAIT_S)  # revocation ended the open session
    finally:
        before.close()
    assert revoked.certificate.not_after > datetime.now(UTC)  # the certificate itself is still valid

    again = DeviceConnection(controlplane, revoked)
    other = DeviceConnection(controlplane, kept)
    try:
        assert again.code == NOT_AUTHORIZED
        assert other.code == ACCEPTED  # the list names the revoked one, not everyone
    finally:
        again.close()
        other.close()


async def test_without_a_usable_crl_no_device_is_admitted(
    controlplane: RunningControlPlane,
    op: operator_pb2_grpc.OperatorServiceStub,
    channel: grpc.aio.Channel,
    tmp_path: Path,
) -> None:
    device = await enroll(controlplane, op, channel, tmp_path)
    controlplane.crl_path.write_bytes(b"-----BEGIN X509 CRL-----\nAAAA\n-----END X509 CRL-----\n")
    refused = DeviceConnection(controlplane, device)
    refused.close()
    assert refused.code == NOT_AUTHORIZED

    await controlplane.revocations.publish_crl()  # what upkeep does with a stale CRL
    admitted = DeviceConnection(controlplane, device)
    admitted.close()
    assert admitted.code == ACCEPTED
