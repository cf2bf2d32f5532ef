"""Replicas starting on one PostgreSQL: first-start work (roots, the first operator) happens once
under an advisory lock, so replicas started at the same moment on an empty database all come
up; and a replica whose online keys do not match the roots in the database refuses to start
with one clear line, while one reading the shared keys from a directory it never writes to
starts."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import shutil
from pathlib import Path

import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from sqlalchemy import text

from edgefleet.controlplane.app.server import RunningControlPlane, ServeError, start_control_plane
from edgefleet.controlplane.app.settings import Settings
from edgefleet.controlplane.store.engine import make_engine
from edgefleet.controlplane.trust.keys import KeyDir, init_keys
from tests.integration.conftest import public_channel

pytestmark = pytest.mark.integration


def replica_settings(data_dir: Path, keys_dir: Path, mosquitto: str, db_url: str) -> Settings:
    return Settings(
        data_dir=data_dir,
        listen="127.0.0.1:0",
        device_listen="127.0.0.1:0",
        mqtt_url=mosquitto,
        keys_dir=keys_dir,
        db_url=db_url,
    )


async def health_status(plane: RunningControlPlane, service: str = "") -> int:
    async with public_channel(plane) as channel:
        response = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=10
        )
    return int(response.status)


@pytest.mark.parametrize("attempt", range(5))
async def test_replicas_started_together_on_an_empty_database_all_serve(
    attempt: int, postgres_database: str, keys: KeyDir, mosquitto: str, tmp_path: Path
) -> None:
    starts = [
        start_control_plane(
            replica_settings(tmp_path / f"r{i}", keys.path, mosquitto, postgres_database), replica_id=f"r{i}"
        )
        for i in range(3)
    ]
    results = await asyncio.gather(*starts, return_exceptions=True)
    planes = [r for r in results if isinstance(r, RunningControlPlane)]
    try:
        assert planes == results, [r for r in results if not isinstance(r, RunningControlPlane)]
        for plane in planes:
            assert await health_status(plane) == health_pb2.HealthCheckResponse.SERVING
        engine = make_engine(postgres_database)
        try:
            with engine.connect() as conn:
                roots = conn.execute(
                    text("SELECT repository, version FROM tufmetadata WHERE role = 'root' ORDER BY 1, 2")
                ).all()
                operators = conn.execute(text("SELECT count(*) FROM operatortoken")).scalar()
        finally:
            engine.dispose()
        assert [tuple(r) for r in roots] == [("director", 1), ("image", 1)]
        assert operators == 1  # one admin, made by whichever replica came first
        assert sum((tmp_path / f"r{i}" / "admin.token").exists() for i in range(3)) == 1
    finally:
        for plane in planes:
            await plane.stop(grace=0)


async def test_a_replica_with_other_online_keys_refuses_to_start(
    postgres_database: str, keys: KeyDir, mosquitto: str, tmp_path: Path
) -> None:
    first = await start_control_plane(
        replica_settings(tmp_path / "a", keys.path, mosquitto, postgres_database)
    )
    try:
        other = init_keys(tmp_path / "other-keys")
        with pytest.raises(ServeError) as refused:
            await start_control_plane(
                replica_settings(tmp_path / "b", other.path, mosquitto, postgres_database)
            )
        message = str(refused.value)
        assert "do not match" in message and str(other.path) in message and "\n" not in message
        assert await health_status(first) == health_pb2.HealthCheckResponse.SERVING
    finally:
        await first.stop(grace=0)


def _tree_digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in root.rglob("*")
        if p.is_file()
    }


async def test_replicas_share_one_keys_directory_and_never_write_to_it(
    postgres_database: str, keys: KeyDir, mosquitto: str, tmp_path: Path
) -> None:
    """The keys directory is a mounted Secret: read-only, shared by every replica."""
    mounted = tmp_path / "secret"
    shutil.copytree(keys.path, mounted)
    before = _tree_digest(mounted)
    mounted.chmod(0o500)
    settings = replica_settings(tmp_path / "a", mounted, mosquitto, postgres_database)
    planes = [
        await start_control_plane(settings, replica_id="a"),
        await start_control_plane(dataclasses.replace(settings, data_dir=tmp_path / "b"), replica_id="b"),
    ]
    try:
        for plane in planes:
            assert await health_status(plane) == health_pb2.HealthCheckResponse.SERVING
        assert planes[0].ca_pem == planes[1].ca_pem
    finally:
        for plane in planes:
            await plane.stop(grace=0)
        mounted.chmod(0o700)
    assert _tree_digest(mounted) == before
