"""An agent killed with SIGKILL in the middle of sending its backlog loses nothing: a record
leaves the outbox only once the broker has acknowledged the message carrying it, so whatever
was in flight at the kill is still in the outbox, and the next publisher on that outbox sends
it again (the control plane drops the duplicates by (device_id, seq)).

A child process runs a real TelemetryPublisher against a real Mosquitto; the database is the
control plane's, filled by a real TelemetryIngestor.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy import func, select
from sqlalchemy.engine import Engine

from edgefleet.agent.telemetry import Outbox, TelemetryPublisher
from edgefleet.controlplane.store.engine import make_engine
from edgefleet.controlplane.store.models import TelemetryRecord
from edgefleet.controlplane.telemetry.ingest import TelemetryIngestor
from edgefleet.protos.fleet.topics import TopicKind
from edgefleet.protos.fleet.v1 import telemetry_pb2
from tests.conftest import Broker, start_broker

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
DEVICE = "dev-crash"
BACKLOG = 3000
KILL_AFTER = 600  # records acknowledged before the kill

_CHILD = """
import sys, time
from pathlib import Path
from edgefleet.agent.telemetry import Outbox, TelemetryPublisher
outbox = Outbox(Path(sys.argv[1]))
publisher = TelemetryPublisher(
    device_id=sys.argv[2], broker_url=sys.argv[3], outbox=outbox, max_batch_records=5, max_inflight=4
)
publisher.start()
while True:  # until killed
    print(publisher.acknowledged, flush=True)
    time.sleep(0.005)
"""


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Broker]:
    (tmp_path / "mosquitto").mkdir()
    running = start_broker(tmp_path / "mosquitto")
    yield running
    running.stop()


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[Engine]:
    made = make_engine(f"sqlite:///{tmp_path / 'controlplane.sqlite3'}")
    yield made
    made.dispose()


def seqs_stored(engine: Engine) -> tuple[int, int, int]:
    """(rows, distinct seqs, highest seq) of the device."""
    table = TelemetryRecord.__table__  # type: ignore[attr-defined]
    with engine.connect() as conn:
        row = conn.execute(
            select(func.count(), func.count(table.c.seq.distinct()), func.max(table.c.seq)).where(
                table.c.device_id == DEVICE
            )
        ).one()
    return int(row[0]), int(row[1]), int(row[2] or 0)


def fill(path: Path, count: int) -> None:
    with Outbox(path) as outbox:
        for i in range(count):
            summary = telemetry_pb2.InferenceSummary(
                schema_version=1, device_id=DEVICE, model="smollm2", requests=1, tokens_per_second=float(i)
            )
            summary.time.FromDatetime(datetime.now(UTC))
            outbox.put(TopicKind.INFERENCE, summary)


def run_until_acknowledged(path: Path, broker_url: str, threshold: int) -> int:
    """Starts the child publisher, SIGKILLs it once it reports ``threshold`` records
    acknowledged, and returns the last count it reported."""
    child = subprocess.Popen(
        [sys.executable, "-c", _CHILD, str(path), DEVICE, broker_url],
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=subprocess.PIPE,
        text=True,
    )
    assert child.stdout is not None
    acknowledged = 0
    deadline = time.monotonic() + 60
    try:
        while acknowledged < threshold:
            line = child.stdout.readline()
            assert line and time.monotonic() < deadline, f"the child stopped at {acknowledged} acknowledged"
            acknowledged = int(line)
        child.send_signal(signal.SIGKILL)  # mid-publish: batches are in flight
    finally:
        child.kill()
        child.wait(10)
    assert child.returncode == -signal.SIGKILL
    return acknowledged


def test_a_publisher_killed_mid_backlog_loses_nothing(broker: Broker, engine: Engine, tmp_path: Path) -> None:
    ingestor = TelemetryIngestor(engine=engine, broker_url=broker.url, client_id="cp-crash")
    ingestor.start()
    try:
        assert ingestor.wait_subscribed(30)
        path = tmp_path / "agent" / "telemetry.sqlite3"
        fill(path, BACKLOG)

        reported = run_until_acknowledged(path, broker.url, KILL_AFTER)

        with Outbox(path) as outbox:
            left = len(outbox)
            assert 0 < left <= BACKLOG - reported, "the kill came too late to test anything"
            publisher = TelemetryPublisher(device_id=DEVICE, broker_url=broker.url, outbox=outbox)
            publisher.start()
            try:
                deadline = time.monotonic() + 120
                while seqs_stored(engine)[1] < BACKLOG and time.monotonic() < deadline:
                    time.sleep(0.1)
                assert _wait(lambda: len(outbox) == 0), f"{len(outbox)} records still in the outbox"
            finally:
                publisher.stop()
        rows, distinct, highest = seqs_stored(engine)
        stats = ingestor.stats()
    finally:
        ingestor.stop()
    print(
        f"\nSIGKILL after {reported} of {BACKLOG} records acknowledged: {left} left in the outbox, "
        f"{stats.rows - BACKLOG} duplicates on the wire, {rows} rows stored"
    )
    assert (rows, distinct, highest) == (BACKLOG, BACKLOG, BACKLOG)  # every seq, exactly once
    assert stats.rows >= BACKLOG


def _wait(predicate: Callable[[], bool], timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True
