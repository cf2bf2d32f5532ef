"""Wires the control plane together: store, blobs, broker, telemetry ingestion, gRPC server
(a TLS port for enrollment and operators, a mutual-TLS port for devices)."""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from sqlalchemy.engine import Engine

from edgefleet.controlplane.api.device_service import DeviceService
from edgefleet.controlplane.api.operator_service import OperatorService
from edgefleet.controlplane.app.collector import tune_for_serving
from edgefleet.controlplane.app.settings import Settings
from edgefleet.controlplane.fleet.notifier import DesiredStateNotifier
from edgefleet.controlplane.fleet.rbac import bootstrap_admin
from edgefleet.controlplane.rollouts.engine import EngineConfig
from edgefleet.controlplane.rollouts.runner import RolloutEngine
from edgefleet.controlplane.store.blobs import BlobStore
from edgefleet.controlplane.store.database import Database
from edgefleet.controlplane.store.engine import make_engine
from edgefleet.controlplane.telemetry.broker import DeviceTls, EmbeddedBroker
from edgefleet.controlplane.telemetry.ingest import TelemetryIngestor, replica_client_id
from edgefleet.controlplane.telemetry.retention import RetentionPolicy, apply_retention
from edgefleet.controlplane.trust.ca import CertificateAuthority, CertificateError, load_ca
from edgefleet.controlplane.trust.keys import KeyDir, KeyStoreError
from edgefleet.controlplane.trust.repositories import Repositories
from edgefleet.controlplane.trust.revocation import Revocations
from edgefleet.controlplane.trust.tls import ServerCertificate, server_hostnames
from edgefleet.protos.fleet.broker_url import parse_broker_url
from edgefleet.protos.fleet.v1 import device_pb2_grpc, operator_pb2_grpc

if TYPE_CHECKING:
    from edgefleet.controlplane.telemetry.exporter import MetricsServer

log = logging.getLogger(__name__)

SERVICE_NAMES = ("fleet.v1.DeviceService", "fleet.v1.OperatorService")
INGESTION_HEALTH = "edgefleet.TelemetryIngestion"
"""The health service name that says whether telemetry ingestion works: NOT_SERVING while a
message has waited longer than ``INGESTION_STALL_S`` for the writer, the broker has been out
of reach that long, or the writer is gone. The overall status ("") and the RPC services stay
SERVING meanwhile: devices can still enroll, update and report status over gRPC."""
INGESTION_STALL_S = 60.0
INGESTION_CHECK_S = 5.0
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
    device_port: int
    ca_pem: bytes
    crl_path: Path
    revocations: Revocations
    engine: Engine
    mqtt_url: str
    broker: EmbeddedBroker | None
    ingestor: TelemetryIngestor
    upkeep: asyncio.Task[None]
    rollouts: RolloutEngine
    device_service: DeviceService
    operator_service: OperatorService
    metrics: MetricsServer | None = None  # the Prometheus endpoint, with --metrics-listen
    ingestion_watch: asyncio.Task[None] | None = None

    async def stop(self, grace: float = 2.0) -> None:
        self.upkeep.cancel()
        if self.ingestion_watch is not None:
            self.ingestion_watch.cancel()
        await self.rollouts.stop()
        if self.metrics is not None:
            await asyncio.to_thread(self.metrics.stop)
        self.revocations.cancel()
        await self.server.stop(grace)
        await self._flush_refusals()
        await asyncio.to_thread(self.ingestor.stop)
        if self.broker is not None:
            await asyncio.to_thread(self.broker.stop)

    async def _flush_refusals(self) -> None:
        """Writes the refusal counts still waiting for their window to close (the summaries of
        each service's RefusalLog) to the audit trail, so a stop loses none. Runs once the server
        has stopped: no call can add a refusal after it. A failure is logged and the stop goes on."""
        for servicer in (self.device_service, self.operator_service):
            try:
                await servicer.guard.refusals.aclose()
            except Exception:
                log.exception("could not write %s's pending refusal summaries", type(servicer).__name__)


async def _upkeep(
    db: Database,
    repositories: Repositories,
    revocations: Revocations,
    retention: RetentionPolicy,
    every: float,
) -> None:
    """Re-signs timestamps and director metadata before they expire, so online devices never
    see a freeze that is only the control plane's own neglect; re-issues the CRL likewise;
    folds telemetry past its retention into hourly rollups. Each job is tried on its own: one
    that fails (logged) never keeps the others from running, and is retried ``every`` seconds."""

    async def refresh() -> None:
        refreshed = await db.run(repositories.refresh_expiring)
        if refreshed:
            log.info("re-signed %d repositories' expiring metadata", refreshed)

    async def crl() -> None:
        if revocations.crl_is_stale():
            await revocations.publish_crl()

    async def retain() -> None:
        result = await asyncio.to_thread(apply_retention, db.engine, retention)
        if result.failed:  # apply_retention logged each; its other steps ran
            log.warning("telemetry retention: %s failed this pass", ", ".join(result.failed))

    while True:
        for name, job in (
            ("metadata refresh", refresh),
            ("CRL re-issue", crl),
            ("telemetry retention", retain),
        ):
            try:
                await job()
            except Exception:
                log.exception("upkeep: %s failed; retrying in %.0fs", name, every)
        await asyncio.sleep(every)


async def watch_ingestion(
    ingestor: TelemetryIngestor,
    health_servicer: health.aio.HealthServicer,
    *,
    stall_after_s: float = INGESTION_STALL_S,
    every: float = INGESTION_CHECK_S,
) -> None:
    """Keeps INGESTION_HEALTH in step with the ingestor and logs each change."""
    serving: bool | None = None
    while True:
        healthy = ingestor.healthy(stall_after_s)
        if healthy != serving:
            status = (
                health_pb2.HealthCheckResponse.SERVING
                if healthy
                else health_pb2.HealthCheckResponse.NOT_SERVING
            )
            await health_servicer.set(INGESTION_HEALTH, status)
            if healthy and serving is not None:
                log.info("telemetry ingestion works again")
            elif not healthy:
                log.error(
                    "telemetry ingestion stalled: writer alive %s, %.0f s since the last write with messages "
                    "waiting, %.0f s without the broker",
                    ingestor.writer_alive(),
                    ingestor.stalled_seconds(),
                    ingestor.disconnected_seconds(),
                )
            serving = healthy
        await asyncio.sleep(every)


def _fleet_ca(settings: Settings) -> CertificateAuthority:
    try:
        ca = load_ca(settings.effective_keys_dir, passphrase=settings.key_passphrase)
    except CertificateError as exc:
        raise ServeError(str(exc)) from exc
    if ca is None:
        raise ServeError(
            f"no fleet CA in {settings.effective_keys_dir}/tls: create the keys with `fleetctl keys init`"
        )
    return ca


def _advertised_device_endpoint(settings: Settings, device_port: int) -> str:
    return settings.device_advertise or f":{device_port}"


async def start_control_plane(
    settings: Settings, *, metrics_listen: str | None = None, replica_id: str | None = None
) -> RunningControlPlane:
    """Starts everything and returns once the gRPC port accepts calls; with ``metrics_listen``
    (HOST:PORT) also the Prometheus exporter (controlplane/telemetry/exporter.py)."""
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
    ca = _fleet_ca(settings)
    certificate = ServerCertificate(
        ca, server_hostnames([settings.listen, settings.device_listen], settings.tls_hostnames)
    )
    blobs = BlobStore(settings.blob_dir)
    notifier = DesiredStateNotifier()

    broker: EmbeddedBroker | None = None
    mqtt_url = settings.mqtt_url
    device_mqtt_url = parse_broker_url(mqtt_url).url if mqtt_url is not None else None  # never our password
    if mqtt_url is None:
        # Devices connect over TLS with the certificate the fleet CA gave them, as to Mosquitto,
        # checked against the CRL Revocations issues (below: until it exists, no device gets
        # in); the control plane's own clients with the password in mqtt_url.
        key_pem, cert_pem = ca.issue_server(server_hostnames(["127.0.0.1:0"]))
        device_tls = DeviceTls(
            ca_pem=ca.certificate_pem, cert_pem=cert_pem, key_pem=key_pem, crl_path=settings.crl_path
        )
        broker = EmbeddedBroker(device_tls=device_tls)
        mqtt_url = await asyncio.to_thread(broker.start)
        device_mqtt_url = broker.device_url
    # One persistent broker session per replica (default: this host's name); replicas share the
    # telemetry stream through a shared subscription.
    try:
        client_id = replica_client_id(replica_id or socket.gethostname())
    except ValueError as exc:
        raise ServeError(str(exc)) from exc
    ingestor = TelemetryIngestor(engine=engine, broker_url=mqtt_url, client_id=client_id)
    metrics = _start_metrics(metrics_listen, engine, ingestor)
    ingestor.start()
    revocations = Revocations(db, ca, settings.crl_path, mqtt_url)
    await revocations.publish_crl()

    server = grpc.aio.server(options=SERVER_OPTIONS)
    port = server.add_secure_port(settings.listen, certificate.credentials(require_client_certificate=False))
    if port == 0:
        raise ServeError(f"cannot listen on {settings.listen}")
    device_port = server.add_secure_port(
        settings.device_listen, certificate.credentials(require_client_certificate=True)
    )
    if device_port == 0:
        raise ServeError(f"cannot listen on {settings.device_listen}")
    device_service = DeviceService(
        db=db,
        blobs=blobs,
        notifier=notifier,
        chunk_size=settings.chunk_size_bytes,
        recheck_seconds=settings.desired_state_recheck_seconds,
        mqtt_url=settings.mqtt_advertise_url or device_mqtt_url or "",
        repositories=repositories,
        ca=ca,
        device_cert_validity=settings.device_cert_validity,
        device_endpoint=_advertised_device_endpoint(settings, device_port),
    )
    device_pb2_grpc.add_DeviceServiceServicer_to_server(device_service, server)
    rollout_config = EngineConfig(tick_seconds=settings.rollout_tick_seconds)
    operator_service = OperatorService(
        db=db,
        blobs=blobs,
        notifier=notifier,
        repositories=repositories,
        on_device_revoked=revocations.device_revoked,
        rollout_config=rollout_config,
    )
    operator_pb2_grpc.add_OperatorServiceServicer_to_server(operator_service, server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    await server.start()
    for name in ("", *SERVICE_NAMES):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    ingestion_watch = asyncio.create_task(watch_ingestion(ingestor, health_servicer))
    upkeep = asyncio.create_task(
        _upkeep(db, repositories, revocations, settings.retention, settings.metadata_refresh_seconds)
    )
    rollouts = RolloutEngine(db=db, repositories=repositories, notifier=notifier, config=rollout_config)
    rollouts.start()
    return RunningControlPlane(
        server=server,
        port=port,
        device_port=device_port,
        ca_pem=ca.certificate_pem,
        crl_path=revocations.crl_path,
        revocations=revocations,
        engine=engine,
        mqtt_url=mqtt_url,
        broker=broker,
        ingestor=ingestor,
        upkeep=upkeep,
        metrics=metrics,
        rollouts=rollouts,
        device_service=device_service,
        operator_service=operator_service,
        ingestion_watch=ingestion_watch,
    )


def _start_metrics(listen: str | None, engine: Engine, ingestor: TelemetryIngestor) -> MetricsServer | None:
    if listen is None:
        return None
    from edgefleet.controlplane.telemetry.exporter import (
        start_metrics_server,  # prometheus_client only when asked for
    )

    try:
        metrics = start_metrics_server(listen, engine, ingestor.stats)
    except (OSError, ValueError) as exc:
        raise ServeError(f"cannot serve metrics on {listen}: {exc}") from exc
    log.info("Prometheus metrics on http://%s:%d/metrics", listen.rpartition(":")[0], metrics.port)
    return metrics


async def serve_forever(
    settings: Settings, *, metrics_listen: str | None = None, replica_id: str | None = None
) -> None:
    """Runs until SIGINT/SIGTERM, then drains in-flight calls."""
    running = await start_control_plane(settings, metrics_listen=metrics_listen, replica_id=replica_id)
    tune_for_serving()
    host = settings.listen.rsplit(":", 1)[0]
    device_host = settings.device_listen.rsplit(":", 1)[0]
    log.info(
        "control plane listening on %s:%d (TLS: enrollment, operators), %s:%d (mutual TLS: devices), MQTT %s",
        host,
        running.port,
        device_host,
        running.device_port,
        parse_broker_url(running.mqtt_url).url,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await running.stop()
