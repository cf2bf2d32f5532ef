"""The control plane's gRPC health service (grpc.health.v1), and the statuses it reports.

The overall status ("") and each RPC service (``SERVICE_NAMES``) are SERVING once the server
has started and NOT_SERVING from the moment it begins to shut down, so a load balancer stops
sending new calls during the grace period; they are also NOT_SERVING while the database does not
answer (``watch_database``), so traffic goes to a replica that can serve it, and SERVING again
once it does. ``INGESTION_HEALTH`` says whether telemetry
ingestion works; it follows the ingestor (``watch_ingestion``) and never changes the others:
devices can still enroll, update and report status over gRPC while ingestion is stalled.

grpc_health's asyncio servicer lives on the server's event loop: every method here must be
awaited on that loop.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Protocol

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

log = logging.getLogger(__name__)

SERVICE_NAMES = ("fleet.v1.DeviceService", "fleet.v1.OperatorService")
INGESTION_HEALTH = "edgefleet.TelemetryIngestion"
"""The health service name that says whether telemetry ingestion works: NOT_SERVING while a
message has waited longer than ``INGESTION_STALL_S`` for the writer, the broker has been out
of reach that long, or the writer is gone."""
INGESTION_STALL_S = 60.0
INGESTION_CHECK_S = 5.0


class IngestionProbe(Protocol):
    """What the health service reads from the telemetry ingestor (any thread may ask)."""

    def healthy(self, stall_after_s: float) -> bool: ...

    def writer_alive(self) -> bool: ...

    def stalled_seconds(self) -> float: ...

    def disconnected_seconds(self) -> float: ...


class DatabaseProbe(Protocol):
    """Whether the database answers now; never raises, bounded in time by its maker."""

    async def alive(self) -> bool: ...


class ControlPlaneHealth:
    """grpc_health's servicer with the control plane's services on it."""

    def __init__(self) -> None:
        self.servicer = health.aio.HealthServicer()
        self._database_up = True

    def add_to(self, server: grpc.aio.Server) -> None:
        health_pb2_grpc.add_HealthServicer_to_server(self.servicer, server)

    async def serving(self) -> None:
        """The server has started: the overall status and every RPC service are SERVING
        (unless the database was found down meanwhile)."""
        await self._set_services(self._database_up)

    async def _set_services(self, up: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if up else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", *SERVICE_NAMES):
            await self.servicer.set(name, status)  # ignored once shutting down

    async def watch_database(self, probe: DatabaseProbe, *, every: float) -> None:
        """Probes the database every ``every`` seconds: NOT_SERVING (overall and every RPC
        service) while it does not answer, SERVING again once it does; logs each change. Runs
        until cancelled."""
        while True:
            up = await probe.alive()
            if up != self._database_up:
                self._database_up = up
                await self._set_services(up)
                if up:
                    log.info("the database answers again: SERVING")
                else:
                    log.error("the database does not answer: NOT_SERVING until it does")
            await asyncio.sleep(every)

    async def shutting_down(self) -> None:
        """The server is about to stop: every status is NOT_SERVING for good."""
        await self.servicer.enter_graceful_shutdown()

    async def watch_ingestion(
        self,
        ingestor: IngestionProbe,
        *,
        stall_after_s: float = INGESTION_STALL_S,
        every: float = INGESTION_CHECK_S,
    ) -> None:
        """Keeps INGESTION_HEALTH in step with the ingestor, checked every ``every`` seconds,
        and logs each change; runs until cancelled."""
        serving: bool | None = None
        while True:
            healthy = ingestor.healthy(stall_after_s)
            if healthy != serving:
                status = (
                    health_pb2.HealthCheckResponse.SERVING
                    if healthy
                    else health_pb2.HealthCheckResponse.NOT_SERVING
                )
                await self.servicer.set(INGESTION_HEALTH, status)
                if healthy and serving is not None:
                    log.info("telemetry ingestion works again")
                elif not healthy:
                    log.error(
                        "telemetry ingestion stalled: writer alive %s, %.0f s since the last write with "
                        "messages waiting, %.0f s without the broker",
                        ingestor.writer_alive(),
                        ingestor.stalled_seconds(),
                        ingestor.disconnected_seconds(),
                    )
                serving = healthy
            await asyncio.sleep(every)
