"""The Prometheus exporter against a real database (SQLite and PostgreSQL), scraped over HTTP.

Figures are written with the control plane's own tables; the scrape is a real GET /metrics
parsed with prometheus_client's parser, as Prometheus would read it.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import create_engine, event
from sqlalchemy.engine import Engine
from sqlmodel import Session
from typer.testing import CliRunner

from edgefleet.controlplane.app import server as server_module
from edgefleet.controlplane.app.server import start_control_plane
from edgefleet.controlplane.app.settings import Settings
from edgefleet.controlplane.cli.main import app as fleetctl
from edgefleet.controlplane.store.engine import make_engine
from edgefleet.controlplane.store.models import Bundle, Device, DeviceModel, utcnow
from edgefleet.controlplane.telemetry.exporter import (
    FleetCollector,
    MetricsServer,
    parse_listen,
    start_metrics_server,
)
from edgefleet.controlplane.trust.keys import KeyDir
from edgefleet.protos.fleet.topics import TopicKind, telemetry_topic
from edgefleet.protos.fleet.v1 import common_pb2

pytestmark = pytest.mark.integration

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


# -- databases ---------------------------------------------------------------------------------


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'controlplane.sqlite3'}"


@pytest.fixture
def postgres_url(postgres_database: str) -> str:
    return postgres_database


@pytest.fixture(params=["sqlite", "postgres"])
def engine(request: pytest.FixtureRequest) -> Iterator[Engine]:
    eng = make_engine(str(request.getfixturevalue(f"{request.param}_url")))
    yield eng
    eng.dispose()


# -- a fleet -----------------------------------------------------------------------------------


def add_bundle(session: Session, name: str, version: int) -> int:
    bundle = Bundle(
        name=name,
        version=version,
        release_metadata=f"{name}@{version}".encode(),
        manifest_json="{}",
        expires_at=utcnow() + timedelta(days=1),
    )
    session.add(bundle)
    session.flush()
    assert bundle.id is not None
    return bundle.id


def model(name: str, version: int, loaded: bool = True) -> dict[str, Any]:
    return {"name": name, "version": version, "variant": "gguf-q4_0", "loaded": loaded}


def build_fleet(engine: Engine) -> None:
    """d1 active on alpha@2 and beta@1, d2 failed on alpha@1 (desired alpha@2), d3 enrolled and
    never seen, d4 revoked (left out of every per-device and per-release figure)."""
    now = utcnow()
    with Session(engine) as s, s.begin():
        alpha1, alpha2, beta1 = add_bundle(s, "alpha", 1), add_bundle(s, "alpha", 2), add_bundle(s, "beta", 1)
        s.add_all(
            [
                Device(
                    id="d1",
                    state=common_pb2.DEVICE_STATE_ACTIVE,
                    online=True,
                    last_seen=now - timedelta(seconds=30),
                    last_tokens_per_second=41.5,
                    last_latency_ms=250.0,
                    requests_total=1234,
                    desired_generation=3,
                    applied_generation=3,
                    models=[model("alpha", 2), model("beta", 1, loaded=False)],
                ),
                Device(
                    id="d2",
                    state=common_pb2.DEVICE_STATE_FAILED,
                    last_seen=now - timedelta(hours=2),
                    desired_generation=2,
                    applied_generation=1,
                    models=[model("alpha", 1)],
                ),
                Device(id="d3", state=common_pb2.DEVICE_STATE_IDLE),
                Device(
                    id="d4",
                    state=common_pb2.DEVICE_STATE_ACTIVE,
                    revoked_at=now,
                    last_seen=now,
                    models=[model("alpha", 2)],
                ),
            ]
        )
        s.flush()
        s.add_all(
            [
                DeviceModel(device_id="d1", name="alpha", bundle_id=alpha2),
                DeviceModel(device_id="d1", name="beta", bundle_id=beta1),
                DeviceModel(device_id="d2", name="alpha", bundle_id=alpha2),
                DeviceModel(device_id="d4", name="alpha", bundle_id=alpha2),
            ]
        )
        del alpha1  # pushed, never deployed: only reported installed (by d2)


def add_devices(engine: Engine, count: int) -> None:
    with Session(engine) as s, s.begin():
        s.add_all(
            [
                Device(id=f"bulk-{i}", state=common_pb2.DEVICE_STATE_ACTIVE, last_seen=utcnow())
                for i in range(count)
            ]
        )


# -- scraping ----------------------------------------------------------------------------------


def scrape(port: int) -> Samples:
    response = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


def names(samples: Samples) -> set[str]:
    return {name for name, _ in samples}


@dataclass
class FakeStats:
    """An IngestStats as the ingestor may grow it: ``late_drops`` stands for a counter added
    after this exporter was written."""

    received: int = 10
    stored: int = 7
    rows: int = 21
    rejected: int = 3
    malformed: int = 2
    device_mismatch: int = 1
    bad_topic: int = 0
    write_failures: int = 0
    late_drops: int = 4


@pytest.fixture
def exporter(engine: Engine) -> Iterator[MetricsServer]:
    metrics = MetricsServer(FleetCollector(engine, FakeStats), "127.0.0.1:0")
    yield metrics
    metrics.stop()


def test_scrape_reports_the_fleet(engine: Engine, exporter: MetricsServer) -> None:
    build_fleet(engine)
    samples = scrape(exporter.port)

    assert value(samples, "edgefleet_devices_enrolled") == 3
    assert value(samples, "edgefleet_devices_revoked") == 1
    assert value(samples, "edgefleet_devices", state="active") == 1
    assert value(samples, "edgefleet_devices", state="failed") == 1
    assert value(samples, "edgefleet_devices", state="idle") == 1
    assert value(samples, "edgefleet_devices", state="rolled_back") == 0  # every state, always

    assert value(samples, "edgefleet_device_tokens_per_second", device="d1") == 41.5
    assert value(samples, "edgefleet_device_latency_seconds", device="d1") == 0.25
    assert value(samples, "edgefleet_device_requests_total", device="d1") == 1234
    assert 30 <= value(samples, "edgefleet_device_last_seen_age_seconds", device="d1") < 90
    assert 7200 <= value(samples, "edgefleet_device_last_seen_age_seconds", device="d2") < 7260
    seen_at = value(samples, "edgefleet_device_last_seen_timestamp_seconds", device="d1")
    assert abs(time.time() - 30 - seen_at) < 60
    assert value(samples, "edgefleet_device_desired_generation", device="d2") == 2
    assert value(samples, "edgefleet_device_applied_generation", device="d2") == 1
    assert value(samples, "edgefleet_device_online", device="d1") == 1
    assert value(samples, "edgefleet_device_online", device="d2") == 0
    assert ("edgefleet_device_last_seen_age_seconds", frozenset({("device", "d3")})) not in samples
    assert value(samples, "edgefleet_device_requests_total", device="d3") == 0
    assert not [key for key in samples if ("device", "d4") in key[1]], "revoked devices have no series"

    assert value(samples, "edgefleet_release_devices_desired", bundle="alpha", version="2") == 2
    assert value(samples, "edgefleet_release_devices_installed", bundle="alpha", version="2") == 1
    assert value(samples, "edgefleet_release_devices_desired", bundle="alpha", version="1") == 0
    assert value(samples, "edgefleet_release_devices_installed", bundle="alpha", version="1") == 1
    assert value(samples, "edgefleet_release_devices_desired", bundle="beta", version="1") == 1
    assert value(samples, "edgefleet_release_devices_installed", bundle="beta", version="1") == 1

    assert value(samples, "edgefleet_ingest_received_total") == 10
    assert value(samples, "edgefleet_ingest_stored_total") == 7
    assert value(samples, "edgefleet_ingest_rejected_total", reason="malformed") == 2
    assert value(samples, "edgefleet_ingest_rejected_total", reason="device_mismatch") == 1
    assert value(samples, "edgefleet_ingest_rejected_total", reason="bad_topic") == 0
    assert value(samples, "edgefleet_ingest_rows_total") == 21
    assert value(samples, "edgefleet_ingest_late_drops_total") == 4, (
        "a counter the ingestor gains is exported"
    )
    assert "edgefleet_ingest_rejected" not in names(samples), "the total is the sum over reasons"
    assert value(samples, "edgefleet_exporter_database_up") == 1

    labels = {key for _, label_set in samples for key, _ in label_set}
    assert labels <= {"state", "device", "bundle", "version", "reason"}, "bounded label sets only"


def test_a_scrape_costs_the_same_few_queries_whatever_the_fleet_size(
    engine: Engine, exporter: MetricsServer
) -> None:
    statements: list[str] = []

    def count(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if statement.lstrip().upper().startswith("SELECT"):
            statements.append(statement)

    build_fleet(engine)
    event.listen(engine, "before_cursor_execute", count)
    try:
        scrape(exporter.port)
        small = len(statements)
        add_devices(engine, 60)
        statements.clear()
        samples = scrape(exporter.port)
    finally:
        event.remove(engine, "before_cursor_execute", count)
    assert value(samples, "edgefleet_devices_enrolled") == 63
    assert small == len(statements) == 3


def test_an_unreachable_database_still_serves_the_ingest_counters(tmp_path: Path) -> None:
    broken = create_engine(f"sqlite:///{tmp_path / 'missing' / 'dir' / 'x.db'}")
    metrics = start_metrics_server("127.0.0.1:0", broken, FakeStats)
    try:
        samples = scrape(metrics.port)
    finally:
        metrics.stop()
        broken.dispose()
    assert value(samples, "edgefleet_exporter_database_up") == 0
    assert value(samples, "edgefleet_ingest_received_total") == 10
    assert "edgefleet_devices_enrolled" not in names(samples)


def test_listen_addresses() -> None:
    assert parse_listen("127.0.0.1:9464") == ("127.0.0.1", 9464)
    assert parse_listen("[::1]:0") == ("::1", 0)
    for bad in ("9464", ":9464", "host:", "host:http", "host:70000"):
        with pytest.raises(ValueError, match="HOST:PORT"):
            parse_listen(bad)


# -- through the control plane -------------------------------------------------------------------


async def test_control_plane_serves_metrics_with_its_ingestor(
    tmp_path: Path, keys: KeyDir, mosquitto: str
) -> None:
    settings = Settings(
        data_dir=tmp_path / "cp",
        listen="127.0.0.1:0",
        device_listen="127.0.0.1:0",
        mqtt_url=mosquitto,
        keys_dir=keys.path,
    )
    running = await start_control_plane(settings, metrics_listen="127.0.0.1:0")
    try:
        assert running.metrics is not None
        port = running.metrics.port
        before = await asyncio.to_thread(scrape, port)
        assert value(before, "edgefleet_devices_enrolled") == 0
        assert value(before, "edgefleet_exporter_database_up") == 1
        assert await asyncio.to_thread(running.ingestor.wait_subscribed, 30)

        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"t-{uuid.uuid4().hex[:8]}")
        host, _, broker_port = mosquitto.removeprefix("mqtt://").partition("?")[0].rpartition(":")
        client.connect(host, int(broker_port))
        client.loop_start()
        client.publish(telemetry_topic("dev-x", TopicKind.HEARTBEAT), b"not json", qos=1).wait_for_publish(10)
        client.loop_stop()
        client.disconnect()

        def scrape_once_rejected(timeout: float = 30) -> Samples:
            deadline = time.monotonic() + timeout
            while True:
                samples = scrape(port)
                key = ("edgefleet_ingest_rejected_total", frozenset({("reason", "malformed")}))
                if samples.get(key, 0) >= 1 or time.monotonic() > deadline:
                    return samples
                time.sleep(0.1)

        after = await asyncio.to_thread(scrape_once_rejected)
        assert value(after, "edgefleet_ingest_rejected_total", reason="malformed") == 1
        assert value(after, "edgefleet_ingest_received_total") >= 1
    finally:
        await running.stop(grace=0)
    with pytest.raises(httpx.TransportError):
        await asyncio.to_thread(httpx.get, f"http://127.0.0.1:{port}/metrics", timeout=2)


def test_fleetctl_serve_passes_metrics_listen(
    monkeypatch: pytest.MonkeyPatch, keys: KeyDir, tmp_path: Path
) -> None:
    seen: dict[str, Any] = {}

    async def fake_serve_forever(settings: Settings, *, metrics_listen: str | None = None, **_: Any) -> None:
        seen["metrics_listen"] = metrics_listen

    monkeypatch.setattr(server_module, "serve_forever", fake_serve_forever)
    base = ["serve", "--keys-dir", str(keys.path), "--data-dir", str(tmp_path / "cp")]
    result = CliRunner().invoke(fleetctl, [*base, "--metrics-listen", "127.0.0.1:9464"])
    assert result.exit_code == 0, result.output
    assert seen == {"metrics_listen": "127.0.0.1:9464"}
    result = CliRunner().invoke(fleetctl, base)
    assert result.exit_code == 0, result.output
    assert seen == {"metrics_listen": None}, "off by default"
