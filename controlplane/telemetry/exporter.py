"""Prometheus exporter of the control plane: fleet aggregates and telemetry ingestion counters.

``fleetctl serve --metrics-listen HOST:PORT`` serves ``GET /metrics``. Every figure is read
from the database when Prometheus scrapes, with three queries whatever the fleet's size (device
counts by state, one row per unrevoked device, device counts per desired release), so the
exporter holds no state of its own, never drifts from the database, and shows what another
control-plane replica wrote too. Ingestion counters come from this process's ingestor.

Label sets stay bounded by the fleet: per-device series carry only ``device`` (its id), per
release series ``bundle`` and ``version``; revoked devices are dropped from per-device series.
A database that fails a scrape is reported as ``edgefleet_exporter_database_up 0`` rather than
an HTTP error, so the ingestion counters are still scraped.

The same listener serves ``GET /crl.pem`` once the control plane hands it the CRL
(``MetricsServer.serve_crl``): the fleet CA's current CRL, built from the database on each
request, so every replica answers with every replica's revocations. A broker host pulls it on
a timer (deploy/systemd/edgefleet-crl.timer). A CRL is public; a database that fails the
request gets 503.

The endpoint has no authentication: listen on loopback or on a network only Prometheus (and the
broker host) reaches.
"""

from __future__ import annotations

import dataclasses
import logging
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from sqlalchemy import func, select
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import SQLAlchemyError

from edgefleet.controlplane.store.deployments import Release
from edgefleet.controlplane.store.models import Bundle, Device, DeviceModel
from edgefleet.controlplane.store.values import as_utc
from edgefleet.controlplane.telemetry.decode import RejectReason
from edgefleet.protos.fleet.v1 import common_pb2

log = logging.getLogger(__name__)

PREFIX = "edgefleet"
INGEST_HELP = {
    "received": "MQTT messages the ingestor received from the broker.",
    "stored": "Record-stream messages (batches) the ingestor wrote.",
    "rows": "Telemetry records those messages carried (duplicates the database ignored included).",
    "presence": "Presence updates the ingestor applied.",
    "status": "Status updates the ingestor applied.",
    "write_failures": "Failed database writes of telemetry batches (each retry counts).",
    "writer_errors": "Unexpected errors the telemetry writer logged and survived.",
    "clamped_times": "Records stamped too far in the future, stored at their arrival time.",
    "dead_letter_failures": "Dead letters the database refused (the messages were acknowledged anyway).",
    "sessions_lost": "Reconnects that found the broker no longer held the ingestor's session.",
    "disconnects": "Broker connections the ingestor lost (client-id takeovers included).",
    "stalled_seconds": "Seconds since the last telemetry write while messages wait; 0 when none wait.",
}
"""Help of the ingestion counters known today; any other integer field of IngestStats (a new
counter) is exported as ``edgefleet_ingest_<field>_total`` with a generic help."""


def state_label(state: int) -> str:
    """A state's label: "active" for DEVICE_STATE_ACTIVE, the number for one this build lacks."""
    try:
        return common_pb2.DeviceState.Name(state).removeprefix("DEVICE_STATE_").lower()
    except ValueError:
        return str(state)


@dataclass(frozen=True, slots=True)
class DeviceRow:
    device_id: str
    tokens_per_second: float
    latency_ms: float
    requests_total: int
    last_seen: datetime | None
    desired_generation: int
    applied_generation: int
    installed: frozenset[Release]
    online: bool | None  # its retained Presence; None: this database has no presence column


@dataclass(frozen=True, slots=True)
class FleetSnapshot:
    """What one scrape read from the database."""

    by_state: dict[int, int]  # unrevoked devices
    revoked: int
    devices: list[DeviceRow]  # unrevoked devices
    desired: dict[Release, int]  # unrevoked devices assigned each release

    @property
    def enrolled(self) -> int:
        return sum(self.by_state.values())

    def installed(self) -> Counter[Release]:
        return Counter(release for device in self.devices for release in device.installed)


def _installed(models: Any, active_bundle: str, active_version: int) -> frozenset[Release]:
    """The releases a device reported holding; an agent that reports no model list but an
    active bundle holds that one."""
    releases = set()
    for model in models if isinstance(models, list) else []:
        if isinstance(model, dict) and model.get("name"):
            releases.add((str(model["name"]), int(model.get("version", 0))))
    if not releases and active_bundle:
        releases.add((active_bundle, active_version))
    return frozenset(releases)


def read_fleet(conn: Connection) -> FleetSnapshot:
    """The fleet's aggregates in three queries, independent of the number of devices."""
    device = Device.__table__  # type: ignore[attr-defined]
    model = DeviceModel.__table__  # type: ignore[attr-defined]
    bundle = Bundle.__table__  # type: ignore[attr-defined]
    unrevoked = device.c.revoked_at.is_(None)

    by_state: dict[int, int] = {}
    revoked = 0
    is_revoked = device.c.revoked_at.is_not(None).label("revoked")
    for state, gone, count in conn.execute(
        select(device.c.state, is_revoked, func.count()).group_by(device.c.state, is_revoked)
    ):
        if gone:
            revoked += count
        else:
            by_state[state] = by_state.get(state, 0) + count

    presence = [device.c.online] if "online" in device.c else []  # stored since Presence exists
    rows = conn.execute(
        select(
            *presence,
            device.c.id,
            device.c.last_tokens_per_second,
            device.c.last_latency_ms,
            device.c.requests_total,
            device.c.last_seen,
            device.c.desired_generation,
            device.c.applied_generation,
            device.c.models,
            device.c.active_bundle,
            device.c.active_version,
        )
        .where(unrevoked)
        .order_by(device.c.id)
    )
    devices = [
        DeviceRow(
            device_id=r.id,
            tokens_per_second=float(r.last_tokens_per_second or 0.0),
            latency_ms=float(r.last_latency_ms or 0.0),
            requests_total=int(r.requests_total or 0),
            last_seen=as_utc(r.last_seen) if r.last_seen is not None else None,
            desired_generation=int(r.desired_generation or 0),
            applied_generation=int(r.applied_generation or 0),
            installed=_installed(r.models, r.active_bundle, r.active_version),
            online=bool(r.online) if presence else None,
        )
        for r in rows
    ]

    desired = {
        (name, version): count
        for name, version, count in conn.execute(
            select(bundle.c.name, bundle.c.version, func.count())
            .select_from(model.join(bundle, model.c.bundle_id == bundle.c.id))
            .join(device, model.c.device_id == device.c.id)
            .where(unrevoked)
            .group_by(bundle.c.name, bundle.c.version)
        )
    }
    return FleetSnapshot(by_state=by_state, revoked=revoked, devices=devices, desired=desired)


def _gauge(name: str, documentation: str, labels: Sequence[str] = ()) -> GaugeMetricFamily:
    return GaugeMetricFamily(f"{PREFIX}_{name}", documentation, labels=list(labels))


def fleet_metrics(snapshot: FleetSnapshot, now: datetime) -> Iterator[Metric]:
    """The snapshot as metric families; every state is listed, at 0 when no device is in it."""
    states = _gauge("devices", "Enrolled, unrevoked devices by lifecycle state.", ["state"])
    known = set(common_pb2.DeviceState.values())
    for state in sorted(known | set(snapshot.by_state)):
        states.add_metric([state_label(state)], snapshot.by_state.get(state, 0))
    yield states
    yield _with_value(_gauge("devices_enrolled", "Enrolled devices that are not revoked."), snapshot.enrolled)
    yield _with_value(_gauge("devices_revoked", "Devices whose access was revoked."), snapshot.revoked)

    tokens = _gauge("device_tokens_per_second", "Decode tokens/s the device last reported.", ["device"])
    latency = _gauge("device_latency_seconds", "Request latency the device last reported.", ["device"])
    requests = CounterMetricFamily(
        f"{PREFIX}_device_requests",
        "Requests the device's agent served (its last heartbeat).",
        labels=["device"],
    )
    seen_at = _gauge("device_last_seen_timestamp_seconds", "When the device last sent telemetry.", ["device"])
    seen_age = _gauge(
        "device_last_seen_age_seconds", "Seconds since the device last sent telemetry.", ["device"]
    )
    desired = _gauge("device_desired_generation", "Generation of the device's desired state.", ["device"])
    applied = _gauge("device_applied_generation", "Generation the device last applied.", ["device"])
    online = _gauge("device_online", "1 if the device's retained presence says connected.", ["device"])
    for d in snapshot.devices:
        label = [d.device_id]
        tokens.add_metric(label, d.tokens_per_second)
        latency.add_metric(label, d.latency_ms / 1000.0)
        requests.add_metric(label, d.requests_total)
        desired.add_metric(label, d.desired_generation)
        applied.add_metric(label, d.applied_generation)
        if d.online is not None:
            online.add_metric(label, 1 if d.online else 0)
        if d.last_seen is not None:  # never seen: no series, rather than an age since 1970
            seen_at.add_metric(label, d.last_seen.timestamp())
            seen_age.add_metric(label, max(0.0, (now - d.last_seen).total_seconds()))
    yield from (tokens, latency, requests, seen_at, seen_age, desired, applied)
    if online.samples:
        yield online

    installed = snapshot.installed()
    on_desired = _gauge("release_devices_desired", "Devices assigned this release.", ["bundle", "version"])
    on_installed = _gauge(
        "release_devices_installed", "Devices reporting this release installed.", ["bundle", "version"]
    )
    for name, version in sorted(set(snapshot.desired) | set(installed)):
        labels = [name, str(version)]
        on_desired.add_metric(labels, snapshot.desired.get((name, version), 0))
        on_installed.add_metric(labels, installed.get((name, version), 0))
    yield from (on_desired, on_installed)


def _with_value(metric: GaugeMetricFamily, value: float) -> GaugeMetricFamily:
    metric.add_metric([], value)
    return metric


def ingest_metrics(stats: object) -> Iterator[Metric]:
    """The ingestor's counters, read field by field from its IngestStats snapshot, so counters
    it gains later are exported too and a field it loses is simply absent."""
    if not dataclasses.is_dataclass(stats):
        return
    fields = {f.name: getattr(stats, f.name, None) for f in dataclasses.fields(stats)}
    values = {
        name: value
        for name, value in fields.items()
        if isinstance(value, int) and not isinstance(value, bool)
    }
    for name, value in fields.items():
        if isinstance(value, float):
            help_text = INGEST_HELP.get(name, f"Telemetry ingestor gauge {name!r} (IngestStats.{name}).")
            yield _with_value(_gauge(f"ingest_{name}", help_text), value)
        elif name.endswith("_by_reason") and isinstance(value, Mapping):
            family = CounterMetricFamily(
                f"{PREFIX}_ingest_{name.removesuffix('_by_reason')}",
                "Telemetry messages kept in the dead-letter table, by reason.",
                labels=["reason"],
            )
            for reason, count in sorted(value.items()):
                family.add_metric([str(reason)], count)
            yield family
    reasons = [r.value for r in RejectReason if r.value in values]
    if reasons:
        rejected = CounterMetricFamily(
            f"{PREFIX}_ingest_rejected", "Telemetry messages rejected, by reason.", labels=["reason"]
        )
        for reason in reasons:
            rejected.add_metric([reason], values[reason])
        yield rejected
    for name, value in values.items():
        if name in reasons or (name == "rejected" and reasons):
            continue  # the total is the sum over reasons
        help_text = INGEST_HELP.get(name, f"Telemetry ingestor counter {name!r} (IngestStats.{name}).")
        yield CounterMetricFamily(f"{PREFIX}_ingest_{name}", help_text, value=value)


class FleetCollector:
    """A prometheus_client collector reading the database at every scrape."""

    def __init__(
        self,
        engine: Engine,
        ingest_stats: Callable[[], object] | None = None,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self._engine = engine
        self._ingest_stats = ingest_stats
        self._clock = clock

    def collect(self) -> Iterator[Metric]:
        started = time.monotonic()
        try:
            with self._engine.connect() as conn:
                snapshot = read_fleet(conn)
        except SQLAlchemyError:
            log.exception("metrics scrape could not read the database")
            snapshot = None
        if snapshot is not None:
            yield from fleet_metrics(snapshot, self._clock())
        if self._ingest_stats is not None:
            yield from ingest_metrics(self._ingest_stats())
        yield _with_value(
            _gauge("exporter_database_up", "1 if this scrape read the database, else 0."),
            0 if snapshot is None else 1,
        )
        yield _with_value(
            _gauge("exporter_scrape_duration_seconds", "Time this scrape took to read its figures."),
            time.monotonic() - started,
        )


def parse_listen(listen: str) -> tuple[str, int]:
    """The (host, port) of "HOST:PORT" or "[v6]:PORT"; raises ValueError naming what is wrong."""
    host, sep, port = listen.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"expected HOST:PORT for the metrics listener, got {listen!r}")
    return host, int(port)


CRL_PATH = "/crl.pem"


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        """Requests are not logged (Prometheus scrapes every few seconds)."""


def _http_server(host: str, port: int, app: Any) -> WSGIServer:
    """A thread-per-request WSGI server on (host, port), IPv4 or IPv6 as the host is, as
    prometheus_client's start_http_server makes it."""
    family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0][0]

    class Server(ThreadingMixIn, WSGIServer):
        address_family = family
        daemon_threads = True

    return make_server(host, port, app, Server, handler_class=_QuietHandler)


class MetricsServer:
    """``GET /metrics`` (and ``GET /crl.pem`` once ``serve_crl`` is called) over HTTP in a
    daemon thread, with its own registry (no global state)."""

    def __init__(self, collector: FleetCollector, listen: str) -> None:
        host, port = parse_listen(listen)
        self.registry = CollectorRegistry(auto_describe=False)  # no database query at registration
        self.registry.register(collector)
        self._metrics_app = make_wsgi_app(self.registry)
        self._crl: Callable[[], bytes] | None = None
        # prometheus_client's own server (start_http_server), with a dispatch in front of it.
        self._httpd: WSGIServer = _http_server(host, port, self._app)
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="metrics", daemon=True)
        self._thread.start()

    def serve_crl(self, crl: Callable[[], bytes]) -> None:
        """Serves ``crl()`` (a PEM CRL, blocking is fine: a worker thread calls it) at /crl.pem."""
        self._crl = crl

    def _app(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        crl = self._crl
        if environ.get("PATH_INFO") != CRL_PATH or crl is None:
            body: list[bytes] = self._metrics_app(environ, start_response)
            return body
        if environ.get("REQUEST_METHOD") != "GET":
            start_response("405 Method Not Allowed", [("Allow", "GET")])
            return [b""]
        try:
            pem = crl()
        except SQLAlchemyError:
            log.warning("cannot read the revocations for %s", CRL_PATH, exc_info=True)
            start_response("503 Service Unavailable", [("Content-Type", "text/plain")])
            return [b"the database does not answer\n"]
        start_response(
            "200 OK",
            [
                ("Content-Type", "application/pkix-crl"),
                ("Content-Length", str(len(pem))),
                ("Cache-Control", "no-store"),
            ],
        )
        return [pem]

    @property
    def port(self) -> int:
        return int(self._httpd.server_port)

    @property
    def host(self) -> str:
        return str(self._httpd.server_address[0])

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)


def start_metrics_server(
    listen: str, engine: Engine, ingest_stats: Callable[[], object] | None = None
) -> MetricsServer:
    """Serves the fleet's metrics on ``listen`` (HOST:PORT, port 0 for any free one)."""
    return MetricsServer(FleetCollector(engine, ingest_stats), listen)
