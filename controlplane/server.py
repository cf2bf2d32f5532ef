"""Wires the control plane together: store, blobs, broker, telemetry ingestion, gRPC server."""

from __future__ import annotations

import asyncio
import logging
import signal
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from sqlalchemy.engine import Engine

from controlplane.blobs import BlobStore
from controlplane.broker import EmbeddedBroker
from controlplane.db.database import Database
from controlplane.db.engine import make_engine
from controlplane.ingest import TelemetryIngestor
from controlplane.keys import KeyDir, KeyStoreError
from controlplane.notifier import DesiredStateNotifier
from controlplane.rbac import bootstrap_admin
from controlplane.repositories import Repositories
from controlplane.services.device_service import DeviceService
from controlplane.services.operator_service import OperatorService
from controlplane.settings import Settings
from protos.fleet.v1 import device_pb2_grpc, operator_pb2_grpc

log = logging.getLogger(__name__)

SERVICE_NAMES = ("fleet.v1.DeviceService", "fleet.v1.OperatorService")
MAX_MESSAGE_BYTES = 8 * 1024 * 1024
SERVER_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    # Desired-state streams are long-lived and devices sit behind NAT: keep them alive.
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
]


class ServeError(Exception):
    """The control plane cannot start with these settings."""


@dataclass
class RunningControlPlane:
    server: grpc.aio.Server
    port: int
    engine: Engine
    mqtt_url: str
    broker: EmbeddedBroker | None
    ingestor: TelemetryIngestor
    upkeep: asyncio.Task[None]

    async def stop(self, grace: float = 2.0) -> None:
        self.upkeep.cancel()
        await self.server.stop(grace)
        await asyncio.to_thread(self.ingestor.stop)
        if self.broker is not None:
            await asyncio.to_thread(self.broker.stop)


async def _keep_metadata_fresh(db: Database, repositories: Repositories, every: float) -> None:
    """Re-signs timestamps and director metadata before they expire, so online devices never
    see a freeze that is only the control plane's own neglect."""
    while True:
        try:
            refreshed = await db.run(repositories.refresh_expiring)
            if refreshed:
                log.info("re-signed %d repositories' expiring metadata", refreshed)
        except Exception:
            log.exception("metadata refresh failed; retrying in %.0fs", every)
        await asyncio.sleep(every)


async def start_control_plane(settings: Settings) -> RunningControlPlane:
    """Starts everything and returns once the gRPC port accepts calls."""
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    engine = make_engine(settings.effective_db_url)
    db = Database(engine)
    keys = KeyDir(settings.effective_keys_dir, passphrase=settings.key_passphrase)
    repositories = Repositories(keys)
    try:
        await db.run(repositories.bootstrap)
        admin_token = await db.run(lambda s: bootstrap_admin(s, data_dir=settings.data_dir))
        if admin_token is not None:
            log.warning("created operator 'admin'; its token is in %s (keep it secret)", admin_token)
    except KeyStoreError as exc:
        raise ServeError(f"cannot load keys from {keys.path}: {exc}") from exc
    blobs = BlobStore(settings.blob_dir)
    notifier = DesiredStateNotifier()

    broker: EmbeddedBroker | None = None
    mqtt_url = settings.mqtt_url
    if mqtt_url is None:
        broker = EmbeddedBroker()
        mqtt_url = await asyncio.to_thread(broker.start)
    ingestor = TelemetryIngestor(engine=engine, broker_url=mqtt_url)
    ingestor.start()

    server = grpc.aio.server(options=SERVER_OPTIONS)
    device_pb2_grpc.add_DeviceServiceServicer_to_server(
        DeviceService(
            db=db,
            blobs=blobs,
            notifier=notifier,
            chunk_size=settings.chunk_size_bytes,
            recheck_seconds=settings.desired_state_recheck_seconds,
            mqtt_url=settings.mqtt_advertise_url or mqtt_url,
            repositories=repositories,
        ),
        server,
    )
    operator_pb2_grpc.add_OperatorServiceServicer_to_server(
        OperatorService(db=db, blobs=blobs, notifier=notifier, repositories=repositories), server
    )
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    port = server.add_insecure_port(settings.listen)
    if port == 0:
        raise ServeError(f"cannot listen on {settings.listen}")
    await server.start()
    for name in ("", *SERVICE_NAMES):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    upkeep = asyncio.create_task(_keep_metadata_fresh(db, repositories, settings.metadata_refresh_seconds))
    return RunningControlPlane(
        server=server,
        port=port,
        engine=engine,
        mqtt_url=mqtt_url,
        broker=broker,
        ingestor=ingestor,
        upkeep=upkeep,
    )


async def serve_forever(settings: Settings) -> None:
    """Runs until SIGINT/SIGTERM, then drains in-flight calls."""
    running = await start_control_plane(settings)
    host = settings.listen.rsplit(":", 1)[0]
    log.info("control plane listening on %s:%d, MQTT %s", host, running.port, running.mqtt_url)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await running.stop()
