"""Fixtures for tests that talk to an in-process control plane over real sockets."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest

from edgefleet.agent.device.tls import DeviceCertificate, csr_pem, new_key, store_certificate
from edgefleet.controlplane.app.server import RunningControlPlane, start_control_plane
from edgefleet.controlplane.app.settings import Settings
from edgefleet.controlplane.fleet.rbac import ADMIN_TOKEN_FILE
from edgefleet.controlplane.trust.keys import KeyDir
from edgefleet.protos.fleet.v1 import device_pb2, device_pb2_grpc, operator_pb2, operator_pb2_grpc


@pytest.fixture
async def controlplane(tmp_path: Path, keys: KeyDir, mosquitto: str) -> AsyncIterator[RunningControlPlane]:
    settings = Settings(
        data_dir=tmp_path / "cp",
        listen="127.0.0.1:0",
        device_listen="127.0.0.1:0",
        mqtt_url=mosquitto,
        keys_dir=keys.path,
    )
    running = await start_control_plane(settings)
    yield running
    await running.stop(grace=0)


def public_channel(controlplane: RunningControlPlane, **kwargs: Any) -> grpc.aio.Channel:
    """TLS to the enrollment/operator port, verified against the fleet CA."""
    credentials = grpc.ssl_channel_credentials(controlplane.ca_pem)
    return grpc.aio.secure_channel(f"127.0.0.1:{controlplane.port}", credentials, **kwargs)


@pytest.fixture
async def channel(controlplane: RunningControlPlane) -> AsyncIterator[grpc.aio.Channel]:
    async with public_channel(controlplane) as ch:
        yield ch


@dataclass
class EnrolledDevice:
    """A device enrolled the way the agent enrolls: key made here, CSR, certificate back."""

    response: device_pb2.EnrollResponse
    certificate: DeviceCertificate
    channel: grpc.aio.Channel  # mutual TLS to the device port

    @property
    def id(self) -> str:
        return self.response.device_id

    @property
    def stub(self) -> device_pb2_grpc.DeviceServiceStub:
        return device_pb2_grpc.DeviceServiceStub(self.channel)


async def enroll_device(
    controlplane: RunningControlPlane, channel: grpc.aio.Channel, token: str, work: Path
) -> EnrolledDevice:
    key = new_key()
    response = await device_pb2_grpc.DeviceServiceStub(channel).Enroll(
        device_pb2.EnrollRequest(bootstrap_token=token, hostname="t", csr=csr_pem(key, "t"))
    )
    certificate = store_certificate(work / f"{response.device_id}.pem", key, response.certificate)
    return EnrolledDevice(response, certificate, device_channel(controlplane, certificate))


def device_channel(controlplane: RunningControlPlane, certificate: DeviceCertificate) -> grpc.aio.Channel:
    return grpc.aio.secure_channel(
        f"127.0.0.1:{controlplane.device_port}", certificate.grpc_credentials(controlplane.ca_pem)
    )


@pytest.fixture
async def enrolled(
    controlplane: RunningControlPlane,
    channel: grpc.aio.Channel,
    op: operator_pb2_grpc.OperatorServiceStub,
    tmp_path: Path,
) -> AsyncIterator[EnrolledDevice]:
    """One freshly enrolled device."""
    token = (await op.CreateToken(operator_pb2.CreateTokenRequest())).token
    device = await enroll_device(controlplane, channel, token, tmp_path)
    yield device
    with contextlib.suppress(Exception):
        await device.channel.close()


class OperatorToken(grpc.aio.UnaryUnaryClientInterceptor, grpc.aio.StreamUnaryClientInterceptor):
    """Adds an operator token to every call, as fleetctl does."""

    def __init__(self, token: str) -> None:
        self.token = token

    def _details(self, details: Any) -> Any:
        return details._replace(
            metadata=[*(details.metadata or ()), ("authorization", f"Bearer {self.token}")]
        )

    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(self._details(details), request)

    async def intercept_stream_unary(self, continuation: Any, details: Any, request_iterator: Any) -> Any:
        return await continuation(self._details(details), request_iterator)


def admin_token(tmp_path: Path) -> str:
    """The token the control plane wrote for its first operator."""
    return (tmp_path / "cp" / ADMIN_TOKEN_FILE).read_text().strip()


@pytest.fixture
async def op(
    controlplane: RunningControlPlane, tmp_path: Path
) -> AsyncIterator[operator_pb2_grpc.OperatorServiceStub]:
    interceptors = [OperatorToken(admin_token(tmp_path))]
    async with public_channel(controlplane, interceptors=interceptors) as ch:
        yield operator_pb2_grpc.OperatorServiceStub(ch)
