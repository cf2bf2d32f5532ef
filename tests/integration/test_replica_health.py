"""Health follows the database: a replica whose PostgreSQL stops answering reports NOT_SERVING
(overall and per RPC service), so load balancers send calls to replicas that can serve them,
and SERVING again once the database answers."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from sqlalchemy.engine import make_url

from edgefleet.controlplane.api.health import SERVICE_NAMES
from edgefleet.controlplane.app.server import RunningControlPlane, start_control_plane
from edgefleet.controlplane.trust.keys import KeyDir
from tests.integration.conftest import public_channel
from tests.integration.test_replica_start import health_status, replica_settings

pytestmark = pytest.mark.integration

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@contextmanager
def database_closed(admin_dsn: str, database: str) -> Iterator[None]:
    """No new connection to ``database`` is accepted and every open one is ended, until the
    block ends."""
    with psycopg.connect(admin_dsn, autocommit=True, connect_timeout=5) as admin:
        admin.execute(f'ALTER DATABASE "{database}" ALLOW_CONNECTIONS false')
        try:
            admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (database,)
            )
            yield
        finally:
            admin.execute(f'ALTER DATABASE "{database}" ALLOW_CONNECTIONS true')


async def wait_status(plane: RunningControlPlane, status: int) -> None:
    """Until the overall status is ``status``, followed with the health service's Watch."""
    async with public_channel(plane) as channel, asyncio.timeout(60):
        watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=""))
        async for response in watch:
            if response.status == status:
                watch.cancel()
                return


async def test_health_is_not_serving_while_the_database_is_unreachable(
    postgres_admin_dsn: str, postgres_database: str, keys: KeyDir, mosquitto: str, tmp_path: Path
) -> None:
    settings = dataclasses.replace(
        replica_settings(tmp_path / "cp", keys.path, mosquitto, postgres_database), db_probe_seconds=0.2
    )
    plane = await start_control_plane(settings)
    try:
        assert await health_status(plane) == SERVING
        with database_closed(postgres_admin_dsn, str(make_url(postgres_database).database)):
            await wait_status(plane, NOT_SERVING)
            for service in SERVICE_NAMES:
                assert await health_status(plane, service) == NOT_SERVING
        await wait_status(plane, SERVING)
        for service in SERVICE_NAMES:
            assert await health_status(plane, service) == SERVING
    finally:
        await plane.stop(grace=0)
