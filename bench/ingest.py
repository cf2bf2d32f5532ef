"""How fast telemetry flows from the broker into the database, against the database's own speed.

    python -m bench.ingest [--quick]

For SQLite and PostgreSQL in turn, a child process plays a fleet: it publishes telemetry
messages (each a JSON array of inference records, as agents batch their outbox) to a
Mosquitto of our own at QoS 1, as fast as the broker takes them. The control plane's real
ingestor (MQTT v5 shared subscription, batched SQLAlchemy Core inserts, dedup by
(device, seq)) stores them; one replica, then two. Measured: sustained messages/s and rows/s
from the first row stored to the last.

Baseline, in the same run and database kind: the same rows written with the same insert
function in batches as large as the ingestor's, with no broker in between. ``ratio`` is
ingestion rows/s over that raw rate (target >= 0.5): what MQTT, decoding and
acknowledgement cost. ``replica_speedup`` is two replicas over one; on this 2-core machine
the broker, the publisher, the database and both replicas share the same cores, so it
shows that replicas split the stream, not how they scale on separate hosts.
Progress goes to stderr; the last stdout line is JSON.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import delete, func, select
from sqlalchemy.engine import Engine
from sqlmodel import Session

from bench.services import postgres_server, start_broker, throwaway_database
from controlplane.db.engine import make_engine
from controlplane.db.models import Device, TelemetryRecord
from controlplane.db.telemetry import IngestRecord, insert_telemetry
from controlplane.ingest import TelemetryIngestor
from protos.fleet.topics import TopicKind, telemetry_topic

TARGET_RATIO = 0.5
BATCH_MESSAGES = 500  # the ingestor's batch size (messages per write)
SESSION_EXPIRY_S = 1  # a finished run's sessions must leave the share group before the next run
T0 = datetime(2026, 11, 1, tzinfo=UTC)


@dataclass(frozen=True, slots=True)
class Load:
    devices: int
    messages: int  # per run
    rows_per_message: int

    @property
    def rows(self) -> int:
        return self.messages * self.rows_per_message


@dataclass(frozen=True, slots=True)
class Run:
    replicas: int
    seconds: float
    messages_per_second: float
    rows_per_second: float


def progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def device_id(i: int) -> str:
    return f"bench-{i:04d}"


def record(device: str, seq: int) -> dict[str, Any]:
    """One InferenceSummary as the agent's outbox encodes it (protobuf JSON mapping)."""
    end = T0 + timedelta(seconds=15 * seq)
    return {
        "schemaVersion": 1,
        "deviceId": device,
        "seq": str(seq),
        "time": end.isoformat().replace("+00:00", "Z"),
        "windowStart": (end - timedelta(seconds=15)).isoformat().replace("+00:00", "Z"),
        "model": "smollm2",
        "bundle": {"name": "smollm2", "version": "3"},
        "variant": "gguf-q4_1",
        "requests": "7",
        "errors": "0",
        "errorsByCode": {},
        "requestsByEndpoint": {"chat.completions": "7"},
        "promptTokens": "212",
        "completionTokens": "640",
        "latencyMsP50": 812.5,
        "latencyMsP95": 1404.0,
        "latencyMsMax": 1530.2,
        "timeToFirstTokenMsP50": 41.0,
        "timeToFirstTokenMsP95": 77.5,
        "tokensPerSecond": 48.7,
    }


def messages(load: Load, run: int) -> Iterator[tuple[str, bytes]]:
    """(topic, payload) of every message of one run; seqs never repeat across runs."""
    per_device = load.messages // load.devices
    for i in range(per_device):
        for d in range(load.devices):
            device = device_id(d)
            first = (run * per_device + i) * load.rows_per_message + 1
            rows = [record(device, first + k) for k in range(load.rows_per_message)]
            yield telemetry_topic(device, TopicKind.INFERENCE), json.dumps(rows).encode()


# -- the fleet, in a child process ------------------------------------------------------------


def publish(broker_url: str, load: Load, run: int) -> None:
    """Publishes one run's messages at QoS 1 and waits for every PUBACK."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

    client = mqtt.Client(
        CallbackAPIVersion.VERSION2, client_id=f"bench-fleet-{run}", protocol=MQTTProtocolVersion.MQTTv5
    )
    client.max_inflight_messages_set(200)
    client.max_queued_messages_set(0)
    host, port = broker_url.removeprefix("mqtt://").split(":")
    client.connect(host, int(port))
    client.loop_start()
    infos = [client.publish(topic, payload, qos=1) for topic, payload in messages(load, run)]
    for info in infos:
        info.wait_for_publish(timeout=120)
    client.disconnect()
    client.loop_stop()


# -- measurement ------------------------------------------------------------------------------


def stored_rows(engine: Engine) -> int:
    with engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(TelemetryRecord)).scalar_one())


def prepare(engine: Engine, load: Load) -> None:
    with Session(engine) as session:
        session.exec(delete(TelemetryRecord))
        for d in range(load.devices):
            if session.get(Device, device_id(d)) is None:
                session.add(Device(id=device_id(d)))
        session.commit()


def ingest_run(engine: Engine, broker_url: str, load: Load, *, replicas: int, run: int) -> Run:
    prepare(engine, load)
    ingestors = [
        TelemetryIngestor(
            engine=engine,
            broker_url=broker_url,
            client_id=f"bench-cp-{run}-{r}",
            batch_size=BATCH_MESSAGES,
            session_expiry_s=SESSION_EXPIRY_S,
        )
        for r in range(replicas)
    ]
    for ingestor in ingestors:
        ingestor.start()
    try:
        for ingestor in ingestors:
            if not ingestor.wait_subscribed(15):
                raise RuntimeError("the ingestor did not subscribe within 15 s")
        fleet = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "bench.ingest",
                "--publish",
                broker_url,
                "--load",
                json.dumps(asdict(load)),
                "--run",
                str(run),
            ]
        )
        first: float | None = None
        deadline = time.monotonic() + 600
        while (count := stored_rows(engine)) < load.rows:
            if count and first is None:
                first = time.monotonic()
            if time.monotonic() > deadline:
                raise RuntimeError(f"only {count} of {load.rows} rows arrived")
            time.sleep(0.05)
        last = time.monotonic()
        if fleet.wait(timeout=60) != 0:
            raise RuntimeError("the publishing fleet failed")
    finally:
        for ingestor in ingestors:
            ingestor.stop()
        time.sleep(SESSION_EXPIRY_S + 1)  # an expired session no longer takes a share of the stream
    seconds = max(last - (first or last), 1e-3)
    return Run(replicas, seconds, load.messages / seconds, load.rows / seconds)


def raw_rate(engine: Engine, load: Load) -> float:
    """Rows/s of the same rows through the same insert, in the ingestor's largest batches."""
    prepare(engine, load)
    records = [
        IngestRecord(device_id=row["deviceId"], kind="inference", seq=int(row["seq"]), time=T0, payload=row)
        for _, payload in messages(load, run=99)
        for row in json.loads(payload)
    ]
    batch = BATCH_MESSAGES * load.rows_per_message
    started = time.perf_counter()
    for i in range(0, len(records), batch):
        insert_telemetry(engine, records=records[i : i + batch])
    return len(records) / (time.perf_counter() - started)


@contextlib.contextmanager
def database(kind: str, work: Path) -> Iterator[Engine]:
    if kind == "sqlite":
        engine = make_engine(f"sqlite:///{work / 'bench.sqlite3'}")
        yield engine
        engine.dispose()
        return
    with postgres_server() as admin, throwaway_database(admin) as url:
        engine = make_engine(url)
        yield engine
        engine.dispose()


def measure(kind: str, broker_url: str, load: Load, work: Path) -> dict[str, Any]:
    with database(kind, work) as engine:
        raw = raw_rate(engine, load)
        progress(f"{kind}: raw batched insert {raw:,.0f} rows/s")
        runs = {}
        for replicas in (1, 2):
            result = ingest_run(engine, broker_url, load, replicas=replicas, run=replicas)
            progress(
                f"{kind}: {replicas} replica(s): {result.messages_per_second:,.0f} messages/s, "
                f"{result.rows_per_second:,.0f} rows/s"
            )
            runs[replicas] = result
    one, two = runs[1], runs[2]
    return {
        "raw_rows_per_second": round(raw),
        "messages_per_second": round(one.messages_per_second),
        "rows_per_second": round(one.rows_per_second),
        "ratio": round(one.rows_per_second / raw, 3),
        "two_replicas_messages_per_second": round(two.messages_per_second),
        "two_replicas_rows_per_second": round(two.rows_per_second),
        "replica_speedup": round(two.rows_per_second / one.rows_per_second, 3),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.ingest", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a short run (well under a minute)")
    parser.add_argument("--databases", default="sqlite,postgres", help="comma-separated: sqlite, postgres")
    parser.add_argument("--publish", help=argparse.SUPPRESS)
    parser.add_argument("--load", help=argparse.SUPPRESS)
    parser.add_argument("--run", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.publish:
        publish(args.publish, Load(**json.loads(args.load)), args.run)
        return
    load = Load(devices=50, messages=2_000, rows_per_message=10) if args.quick else Load(50, 20_000, 10)
    with tempfile.TemporaryDirectory(prefix="bench-ingest-") as tmp:
        work = Path(tmp)
        (work / "mosquitto").mkdir()
        broker = start_broker(work / "mosquitto")
        try:
            results = {kind: measure(kind, broker.url, load, work) for kind in args.databases.split(",")}
        finally:
            broker.stop()
    worst = min(r["ratio"] for r in results.values())
    print(
        json.dumps(
            {
                "benchmark": "ingest",
                "load": asdict(load),
                "figures": results,
                "baseline": "raw batched insert of the same rows, same function, same database",
                "ratio": worst,
                "target": TARGET_RATIO,
                "met": worst >= TARGET_RATIO,
            }
        )
    )


if __name__ == "__main__":
    main()
