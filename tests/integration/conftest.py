"""Fixtures for tests that talk to an in-process control plane over real sockets."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from controlplane.keys import KeyDir
from controlplane.rbac import ADMIN_TOKEN_FILE
from controlplane.server import RunningControlPlane, start_control_plane
from controlplane.settings import Settings
from protos.fleet.v1 import operator_pb2_grpc


@pytest.fixture
async def controlplane(tmp_path: Path, keys: KeyDir, mosquitto: str) -> AsyncIterator[RunningControlPlane]:
    settings = Settings(
        data_dir=tmp_path / "cp", listen="127.0.0.1:0", mqtt_url=mosquitto, keys_dir=keys.path
    )
    running = await start_control_plane(settings)
    yield running
    await running.stop(grace=0)


@pytest.fixture
async def channel(controlplane: RunningControlPlane) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{controlplane.port}") as ch:
        yield ch


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
    async with grpc.aio.insecure_channel(f"127.0.0.1:{controlplane.port}", interceptors=interceptors) as ch:
        yield operator_pb2_grpc.OperatorServiceStub(ch)
