"""A control plane that stops writes the refusals still waiting for their window to the audit
trail: real sockets, the real control plane, its own database afterwards."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import grpc
import pytest
from sqlalchemy import select

from edgefleet.agent.device.tls import csr_pem, new_key
from edgefleet.controlplane.app.server import start_control_plane
from edgefleet.controlplane.app.settings import Settings
from edgefleet.controlplane.store.models import AuditEntry
from edgefleet.controlplane.trust.keys import KeyDir
from edgefleet.protos.fleet.v1 import device_pb2, device_pb2_grpc

pytestmark = pytest.mark.integration


async def test_refusals_counted_in_an_open_window_are_summarised_at_stop(
    tmp_path: Path, keys: KeyDir, mosquitto: str
) -> None:
    settings = Settings(
        data_dir=tmp_path / "cp",
        listen="127.0.0.1:0",
        device_listen="127.0.0.1:0",
        mqtt_url=mosquitto,
        keys_dir=keys.path,
    )
    running = await start_control_plane(settings)
    try:
        credentials = grpc.ssl_channel_credentials(running.ca_pem)
        async with grpc.aio.secure_channel(f"127.0.0.1:{running.port}", credentials) as channel:
            stub = device_pb2_grpc.DeviceServiceStub(channel)
            request = device_pb2.EnrollRequest(bootstrap_token="not-a-token", csr=csr_pem(new_key(), "x"))
            for _ in range(3):  # the first is audited at once, the other two wait for the window
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await stub.Enroll(request)
                assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
    finally:
        await running.stop(grace=0)

    with running.engine.connect() as conn:
        rows = conn.execute(
            select(AuditEntry.action, AuditEntry.detail).where(AuditEntry.actor == "device:unenrolled")  # type: ignore[call-overload]
        ).all()
    details: list[dict[str, Any]] = [detail for action, detail in rows if action == "device.enroll"]
    assert len(details) == 2, details  # the first refusal, then the summary written at stop
    assert "repeats" not in details[0] and details[0]["peer"] == "127.0.0.1"
    assert details[1]["repeats"] == 2 and details[1]["peer"] == "127.0.0.1"
    running.engine.dispose()
