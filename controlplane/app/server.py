"""Wires the control plane together and owns what it starts: store, blobs, broker, telemetry
ingestion, the Prometheus exporter, the gRPC server (a TLS port for enrollment and operators, a
mutual-TLS port for devices), periodic upkeep and the rollout engine.

Everything started is registered on one ``AsyncExitStack`` the moment it has started, so a
failure half-way (a port already taken, the broker failing to start) stops whatever had started
before the error is raised, and shutdown stops everything in the reverse order of start-up:
the rollout engine, upkeep and the health watch first, then the gRPC server (health NOT_SERVING,
in-flight calls given ``grace`` seconds, then the refusal counts still waiting for their window
written to the audit trail), the revocation tasks, the ingestor (what arrived is written), the
exporter, the broker, and last the database pool. ``control_plane()`` brackets a control plane
with ``async with``; ``start_control_plane()`` returns one that ``stop()`` ends.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
from sqlalchemy.engine import Engine

from edgefleet.controlplane.api.device_service import DeviceService
from edgefleet.controlplane.api.health import ControlPlaneHealth
from edgefleet.controlplane.api.operator_service import OperatorService
from edgefleet.controlplane.app.collector import tune_for_serving
from edgefleet.controlplane.app.dbprobe import SqlProbe
from edgefleet.controlplane.app.drain import StreamDrain
from edgefleet.controlplane.app.first_start import KeysDoNotMatch, first_start
from edgefleet.controlplane.app.lifetime import GrpcServer, ServeError, background
from edgefleet.controlplane.app.settings import Settings
from edgefleet.controlplane.app.upkeep import upkeep
from edgefleet.controlplane.fleet.broker_notices import BrokerNotices
from edgefleet.controlplane.fleet.notifier import DesiredStateNotifier
from edgefleet.controlplane.rollouts.engine import EngineConfig
from edgefleet.controlplane.rollouts.runner import RolloutEngine
from edgefleet.controlplane.store.blobs import open_blob_store
from edgefleet.controlplane.store.database import Database
from edgefleet.controlplane.store.engine import make_engine
from edgefleet.controlplane.telemetry.broker import BrokerStartError, DeviceTls, EmbeddedBroker
from edgefleet.controlplane.telemetry.ingest import TelemetryIngestor, replica_client_id
from edgefleet.controlplane.trust.ca import CertificateAuthority, CertificateError, load_ca
from edgefleet.controlplane.trust.keys import KeyDir, KeyStoreError
from edgefleet.controlplane.trust.repositories import Repositories, RepositoryRefusal
from edgefleet.controlplane.trust.revocation import Revocations
from edgefleet.controlplane.trust.tls import ServerCertificate, server_hostnames
from edgefleet.protos.fleet.broker_url import parse_broker_url
from edgefleet.protos.fleet.v1 import device_pb2_grpc, operator_pb2_grpc

if TYPE_CHECKING:
    from edgefleet.controlplane.telemetry.exporter import MetricsServer

__all__ = [
    "MAX_MESSAGE_BYTES",
    "SERVER_OPTIONS",
    "RunningControlPlane",
    "ServeError",
    "control_plane",
    "serve_forever",
    "start_control_plane",
]

log = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 8 * 1024 * 1024
SERVER_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    # Desired-state streams are long-lived and devices sit behind NAT: keep them alive.
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    # TLS records of at most 4 KiB instead of 16: the TLS frame protector of every connection
    # holds a buffer of this size for its life, and the control plane holds one connection per
    # device. Measured (bench.fanout's connection figure, and a bare grpc.aio server): about
    # 5 KiB less per connected device; artifact downloads (bench.replicas_blobs, 1 MiB chunks)
    # within ~3% of their rate with 16 KiB records. gRPC takes 1 KiB at least.
    ("grpc.tsi.max_frame_size", 4096),
]


def server_options(settings: Settings) -> list[tuple[str, int]]:
    """SERVER_OPTIONS plus the connection age: gRPC sends GOAWAY to a connection older than
    ``max_connection_age_seconds`` (+/-10% jitter of its own), gives its calls the grace, and the
    client reconnects, through its load balancer or name resolution, possibly to a replica
    added since; a device stream ended this way ends UNAVAILABLE, which agents reconnect on.
    A connection with no call for ``max_connection_idle_seconds`` is closed (GOAWAY): an idle
    device holds no connection here."""
    return [
        *SERVER_OPTIONS,
        ("grpc.max_connection_age_ms", int(settings.max_connection_age_seconds * 1000)),
        ("grpc.max_connection_age_grace_ms", int(settings.max_connection_age_grace_seconds * 1000)),
        ("grpc.max_connection_idle_ms", int(settings.max_connection_idle_seconds * 1000)),
    ]


DEFAULT_GRACE_S = 2.0


@dataclass
class _Shutdown:
    """How long in-flight calls get when the server stops: set by ``stop`` before it unwinds."""

    grace: float = DEFAULT_GRACE_S


@dataclass
class RunningControlPlane:
    """A started control plane: what tests and the CLI reach into, and ``stop``."""

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
    notices: BrokerNotices
    rollouts: RolloutEngine
    device_service: DeviceService
    operator_service: OperatorService
    health: ControlPlaneHealth
    metrics: MetricsServer | None = None  # the Prometheus endpoint, with --metrics-listen
    _resources: AsyncExitStack = field(default_factory=AsyncExitStack, repr=False)
    _shutdown: _Shutdown = field(default_factory=_Shutdown, repr=False)

    async def stop(self, grace: float = DEFAULT_GRACE_S) -> None:
        """Stops everything in the reverse order of start-up, giving in-flight calls ``grace``
        seconds; a second call does nothing."""
        self._shutdown.grace = grace
        await self._resources.aclose()


async def start_control_plane(
    settings: Settings, *, metrics_listen: str | None = None, replica_id: str | None = None
) -> RunningControlPlane:
    """Starts everything and returns once the gRPC port accepts calls; with ``metrics_listen``
    (HOST:PORT) also the Prometheus exporter (controlplane/telemetry/exporter.py). Raises
    ServeError, having stopped whatever had started, when it cannot start."""
    async with AsyncExitStack() as stack:
        shutdown = _Shutdown(grace=0.0)  # a start that fails has no calls worth waiting for
        running = await _start(
            stack, shutdown, settings, metrics_listen=metrics_listen, replica_id=replica_id
        )
        shutdown.grace = DEFAULT_GRACE_S
        running._resources = stack.pop_all()  # from here on, stop() owns them
        running._shutdown = shutdown
    return running


@asynccontextmanager
async def control_plane(
    settings: Settings, *, metrics_listen: str | None = None, replica_id: str | None = None
) -> AsyncIterator[RunningControlPlane]:
    """A running control plane for the ``async with`` block; stopped at its end."""
    running = await start_control_plane(settings, metrics_listen=metrics_listen, replica_id=replica_id)
    try:
        yield running
    finally:
        await running.stop()


async def serve_forever(
    settings: Settings, *, metrics_listen: str | None = None, replica_id: str | None = None
) -> None:
    """Runs until SIGINT/SIGTERM, then drains in-flight calls."""
    running = await start_control_plane(settings, metrics_listen=metrics_listen, replica_id=replica_id)
    try:
        tune_for_serving()
        host = settings.listen.rsplit(":", 1)[0]
        device_host = settings.device_listen.rsplit(":", 1)[0]
        log.info(
            "control plane listening on %s:%d (TLS: enrollment, operators), "
            "%s:%d (mutual TLS: devices), MQTT %s",
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
        log.info(
            "stopping: device streams end now, calls in flight get %.0fs", settings.shutdown_grace_seconds
        )
    finally:
        await running.stop(settings.shutdown_grace_seconds)


async def _start(
    stack: AsyncExitStack,
    shutdown: _Shutdown,
    settings: Settings,
    *,
    metrics_listen: str | None,
    replica_id: str | None,
) -> RunningControlPlane:
    """Starts each part and registers its stop on ``stack`` as soon as it runs."""
    # One persistent broker session per replica (default: this host's name); replicas share the
    # telemetry stream through a shared subscription.
    try:
        client_id = replica_client_id(replica_id or socket.gethostname())
    except ValueError as exc:
        raise ServeError(str(exc)) from exc
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    engine = make_engine(settings.effective_db_url)
    stack.callback(engine.dispose)
    db = Database(engine)
    repositories = await _repositories(db, settings)
    ca = _fleet_ca(settings)
    certificate = ServerCertificate(
        ca, server_hostnames([settings.listen, settings.device_listen], settings.tls_hostnames)
    )
    # By the database: PostgreSQL large objects every replica shares, else the local directory.
    blobs = await asyncio.to_thread(open_blob_store, engine, settings.blob_dir)
    notifier = DesiredStateNotifier()

    broker, mqtt_url, device_mqtt_url = await _broker(stack, settings, ca)
    ingestor = TelemetryIngestor(engine=engine, broker_url=mqtt_url, client_id=client_id)
    metrics = _start_metrics(metrics_listen, engine, ingestor)
    if metrics is not None:
        stack.push_async_callback(asyncio.to_thread, metrics.stop)
    ingestor.start()
    stack.push_async_callback(asyncio.to_thread, ingestor.stop)
    # Desired-state changes this replica commits reach devices through the broker too: a
    # device that listens there holds no connection here while idle.
    notices = BrokerNotices(db=db, broker_url=mqtt_url, client_id=f"{client_id}-notices")
    notices.start()
    stack.push_async_callback(notices.stop)
    notifier.on_change(notices.announce)
    revocations = Revocations(db, ca, settings.crl_path, mqtt_url)
    stack.callback(revocations.cancel)
    await revocations.publish_crl()
    if metrics is not None:
        metrics.serve_crl(revocations.current_crl)

    drain = StreamDrain()
    grpc_server = GrpcServer(server_options(settings), interceptors=[drain])
    stack.push_async_callback(grpc_server.release)
    port = grpc_server.listen(
        settings.listen, certificate.credentials(require_client_certificate=False), "enrollment and operators"
    )
    device_port = grpc_server.listen(
        settings.device_listen, certificate.credentials(require_client_certificate=True), "devices"
    )
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
        device_endpoint=settings.device_advertise or f":{device_port}",
    )
    device_pb2_grpc.add_DeviceServiceServicer_to_server(device_service, grpc_server.server)
    feed = await stack.enter_async_context(device_service.changes())  # LISTEN/NOTIFY, safety net
    # Any replica's revocation rewrites this replica's CRL file at once (what a broker on this
    # host reads); revocations.follow is the slower check behind it.
    feed.on_revoked(revocations.heard_revocation)
    rollout_config = EngineConfig(tick_seconds=settings.rollout_tick_seconds)
    rollouts = RolloutEngine(db=db, repositories=repositories, notifier=notifier, config=rollout_config)
    operator_service = OperatorService(
        db=db,
        blobs=blobs,
        notifier=notifier,
        repositories=repositories,
        on_device_revoked=revocations.device_revoked,
        rollout_config=rollout_config,
        wake_rollouts=rollouts.wake,
    )
    operator_pb2_grpc.add_OperatorServiceServicer_to_server(operator_service, grpc_server.server)
    health = ControlPlaneHealth()
    health.add_to(grpc_server.server)
    await grpc_server.start()
    stack.push_async_callback(
        _drain, grpc_server.server, health, drain, shutdown, (device_service, operator_service)
    )
    await _watch_database(stack, health, settings)
    await health.serving()
    await stack.enter_async_context(
        background(revocations.follow(settings.crl_refresh_seconds), "crl-follow")
    )
    await stack.enter_async_context(background(health.watch_ingestion(ingestor), "ingestion-health"))
    await stack.enter_async_context(
        background(
            upkeep(db, repositories, revocations, settings.retention, settings.metadata_refresh_seconds),
            "upkeep",
        )
    )
    rollouts.start()
    stack.push_async_callback(rollouts.stop)
    return RunningControlPlane(
        server=grpc_server.server,
        port=port,
        device_port=device_port,
        ca_pem=ca.certificate_pem,
        crl_path=revocations.crl_path,
        revocations=revocations,
        engine=engine,
        mqtt_url=mqtt_url,
        broker=broker,
        ingestor=ingestor,
        notices=notices,
        rollouts=rollouts,
        device_service=device_service,
        operator_service=operator_service,
        health=health,
        metrics=metrics,
    )


async def _repositories(db: Database, settings: Settings) -> Repositories:
    """The update repositories, bootstrapped, and the first operator if there is none: once,
    under the first-start lock (app/first_start.py), however many replicas start together."""
    keys = KeyDir(settings.effective_keys_dir, passphrase=settings.key_passphrase)
    repositories = Repositories(keys)
    try:
        admin_token = await db.run(lambda s: first_start(s, repositories, data_dir=settings.data_dir))
    except KeysDoNotMatch as exc:
        raise ServeError(str(exc)) from exc
    except (KeyStoreError, RepositoryRefusal) as exc:
        raise ServeError(f"cannot load keys from {keys.path}: {exc}") from exc
    if admin_token is not None:
        log.warning("created operator 'admin'; its token is in %s (keep it secret)", admin_token)
    return repositories


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


async def _broker(
    stack: AsyncExitStack, settings: Settings, ca: CertificateAuthority
) -> tuple[EmbeddedBroker | None, str, str | None]:
    """The broker the control plane's clients use (URL with its password) and the URL devices
    are told: ``settings.mqtt_url``, or without one the embedded broker, started here."""
    if settings.mqtt_url is not None:
        return None, settings.mqtt_url, parse_broker_url(settings.mqtt_url).url  # never our password
    # Devices connect over TLS with the certificate the fleet CA gave them, as to Mosquitto,
    # checked against the CRL Revocations issues (until it exists, no device gets in); the
    # control plane's own clients with the password in the URL.
    key_pem, cert_pem = ca.issue_server(server_hostnames(["127.0.0.1:0"]))
    device_tls = DeviceTls(
        ca_pem=ca.certificate_pem, cert_pem=cert_pem, key_pem=key_pem, crl_path=settings.crl_path
    )
    broker = EmbeddedBroker(device_tls=device_tls)
    try:
        mqtt_url = await asyncio.to_thread(broker.start)
    except BrokerStartError as exc:
        raise ServeError(str(exc)) from exc  # start() joined its thread: nothing is left running
    stack.push_async_callback(asyncio.to_thread, broker.stop)
    return broker, mqtt_url, broker.device_url


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


async def _watch_database(stack: AsyncExitStack, health: ControlPlaneHealth, settings: Settings) -> None:
    """Health follows the database: a probe of its own every ``db_probe_seconds``."""
    probe = SqlProbe(settings.effective_db_url, timeout=settings.db_probe_timeout_seconds)
    stack.callback(probe.close)
    await stack.enter_async_context(
        background(health.watch_database(probe, every=settings.db_probe_seconds), "database-health")
    )


async def _drain(
    server: grpc.aio.Server,
    health: ControlPlaneHealth,
    drain: StreamDrain,
    shutdown: _Shutdown,
    servicers: tuple[DeviceService, OperatorService],
) -> None:
    """Stops the started server: health NOT_SERVING, server-streaming calls (device streams)
    ended UNAVAILABLE so agents reconnect elsewhere, unary calls given the grace period,
    then each servicer's pending refusal summaries (its RefusalLog) written to the audit trail,
    so a stop loses none; no call can add a refusal once the server has stopped. A failure to
    write them is logged and the stop goes on."""
    await health.shutting_down()
    drain.begin()
    await server.stop(shutdown.grace)
    for servicer in servicers:
        try:
            await servicer.guard.refusals.aclose()
        except Exception:
            log.exception("could not write %s's pending refusal summaries", type(servicer).__name__)
