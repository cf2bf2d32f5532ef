"""The CRL comes from the database: a device revoked through replica A is listed by replica B's
``GET /crl.pem`` at once, and B rewrites its own CRL file (what its broker reads) when it finds
the database lists revocations its file does not."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import shlex
import subprocess
from pathlib import Path

import httpx
import pytest
from cryptography import x509

from edgefleet.controlplane.app.server import RunningControlPlane, start_control_plane
from edgefleet.controlplane.trust.keys import KeyDir
from edgefleet.protos.fleet.v1 import operator_pb2, operator_pb2_grpc
from tests.integration.conftest import OperatorToken, admin_token, enroll_device, public_channel
from tests.integration.test_replica_start import replica_settings
from tests.integration.test_rollout_sim import eventually

pytestmark = pytest.mark.integration

CRL_UNIT = Path(__file__).resolve().parents[2] / "deploy" / "systemd" / "edgefleet-crl.service"


def serials(pem: bytes) -> set[int]:
    return {entry.serial_number for entry in x509.load_pem_x509_crl(pem)}


async def crl_over_http(plane: RunningControlPlane) -> bytes:
    assert plane.metrics is not None
    async with httpx.AsyncClient() as client:
        response = await client.get(f"http://127.0.0.1:{plane.metrics.port}/crl.pem", timeout=10)
    response.raise_for_status()
    assert response.headers["content-type"] == "application/pkix-crl"
    return response.content


@pytest.mark.parametrize(
    "refresh_seconds",
    [
        pytest.param(3600.0, id="B-rewrites-on-the-revocation-notice"),
        pytest.param(0.2, id="B-rewrites-on-notice-or-refresh"),
    ],
)
async def test_a_revocation_through_one_replica_reaches_every_replicas_crl(
    postgres_database: str, keys: KeyDir, mosquitto: str, tmp_path: Path, refresh_seconds: float
) -> None:
    settings = dataclasses.replace(
        replica_settings(tmp_path / "a" / "cp", keys.path, mosquitto, postgres_database),
        crl_refresh_seconds=refresh_seconds,
    )
    a = await start_control_plane(settings, metrics_listen="127.0.0.1:0", replica_id="a")
    b = await start_control_plane(
        dataclasses.replace(settings, data_dir=tmp_path / "b" / "cp"),
        metrics_listen="127.0.0.1:0",
        replica_id="b",
    )
    try:
        async with public_channel(a, interceptors=[OperatorToken(admin_token(tmp_path / "a"))]) as ch:
            op = operator_pb2_grpc.OperatorServiceStub(ch)
            token = (await op.CreateToken(operator_pb2.CreateTokenRequest())).token
            device = await enroll_device(a, ch, token, tmp_path)
            await device.channel.close()
            serial = device.certificate.certificate.serial_number
            assert serial not in serials(await crl_over_http(b))
            assert serial not in serials(b.crl_path.read_bytes())

            await op.RevokeDevice(operator_pb2.RevokeDeviceRequest(device_id=device.id))

        assert serial in serials(await crl_over_http(b))  # served from the database: no delay
        assert serial in serials(await crl_over_http(a))
        assert serial in serials(a.crl_path.read_bytes())  # the replica that revoked, at once
        # B's file: at A's revocation notice (with an hour-long refresh, nothing else rewrites it).
        await eventually(lambda: serial in serials(b.crl_path.read_bytes()), within=10)
        assert x509.load_pem_x509_crl(await crl_over_http(b)).is_signature_valid(
            x509.load_pem_x509_certificate(b.ca_pem).public_key()  # type: ignore[arg-type]
        )
    finally:
        await b.stop(grace=0)
        await a.stop(grace=0)


def unit_commands(unit: Path, key: str, etc: Path) -> list[list[str]]:
    """The unit's ``key=`` command lines as systemd runs them: continuation lines joined, ``$$``
    unescaped, with Mosquitto's directory moved to ``etc``."""
    joined = unit.read_text().replace("\\\n", " ")
    values = [line.split("=", 1)[1] for line in joined.splitlines() if line.startswith(f"{key}=")]
    return [shlex.split(v.replace("$$", "$").replace("/etc/mosquitto/edgefleet", str(etc))) for v in values]


async def test_the_broker_hosts_unit_pulls_the_crl_and_installs_it_only_when_it_changed(
    postgres_database: str, keys: KeyDir, mosquitto: str, tmp_path: Path
) -> None:
    """deploy/systemd/edgefleet-crl.service in pull mode, its commands run as systemd would
    (but for the Mosquitto reload) against a replica's /crl.pem."""
    etc = tmp_path / "etc"
    etc.mkdir()
    [condition] = unit_commands(CRL_UNIT, "ExecCondition", etc)
    install = unit_commands(CRL_UNIT, "ExecStart", etc)[0]
    plane = await start_control_plane(
        replica_settings(tmp_path / "cp", keys.path, mosquitto, postgres_database),
        metrics_listen="127.0.0.1:0",
    )
    assert plane.metrics is not None
    env = {**os.environ, "EDGEFLEET_CRL_URL": f"http://127.0.0.1:{plane.metrics.port}/crl.pem"}

    def run(command: list[str]) -> int:
        return subprocess.run(command, env=env, check=False, timeout=60).returncode

    try:
        async with public_channel(plane, interceptors=[OperatorToken(admin_token(tmp_path))]) as ch:
            op = operator_pb2_grpc.OperatorServiceStub(ch)
            token = (await op.CreateToken(operator_pb2.CreateTokenRequest())).token
            device = await enroll_device(plane, ch, token, tmp_path)
            await device.channel.close()
            serial = device.certificate.certificate.serial_number

            assert await asyncio.to_thread(run, condition) == 0  # nothing installed yet
            assert await asyncio.to_thread(run, install) == 0
            installed = etc / "devices.crl.pem"
            assert serials(installed.read_bytes()) == set()
            assert await asyncio.to_thread(run, condition) == 1  # same serials: skipped

            await op.RevokeDevice(operator_pb2.RevokeDeviceRequest(device_id=device.id))
            assert await asyncio.to_thread(run, condition) == 0
            assert await asyncio.to_thread(run, install) == 0
            assert serials(installed.read_bytes()) == {serial}
            assert oct(installed.stat().st_mode & 0o777) == "0o644"
    finally:
        await plane.stop(grace=0)
