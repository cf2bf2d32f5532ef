"""The ingestion writer survives an unexpected (non-database) error: it logs it, counts it in
``writer_errors``, dead-letters and acknowledges the batch it had in hand, and stores the
messages after it. A fake store and a fake broker client; the ingestor's own threads."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from sqlalchemy import create_engine

from edgefleet.controlplane.store.telemetry import DeadLetter, IngestRecord
from edgefleet.controlplane.telemetry import batch_writer
from edgefleet.controlplane.telemetry.decode import RejectReason
from edgefleet.controlplane.telemetry.ingest import TelemetryIngestor
from edgefleet.protos.fleet.topics import TopicKind, telemetry_topic

DEVICE = "dev-1"
TOPIC = telemetry_topic(DEVICE, TopicKind.HEARTBEAT)
WAIT_S = 30.0


class StoreBug(RuntimeError):
    """What the fake store raises once: no database error, a bug."""


@dataclass
class FakeStore:
    """Stands in for the database: the first write raises StoreBug, later ones are kept."""

    records: list[IngestRecord] = field(default_factory=list)
    letters: list[DeadLetter] = field(default_factory=list)
    calls: int = 0
    changed: threading.Condition = field(default_factory=threading.Condition)

    def store_batch(self, engine: Any, *, records: list[IngestRecord], **_: Any) -> None:
        with self.changed:
            self.calls += 1
            if self.calls == 1:
                raise StoreBug("the store broke")
            self.records.extend(records)
            self.changed.notify_all()

    def store_dead_letters(self, engine: Any, letters: list[DeadLetter]) -> None:
        with self.changed:
            self.letters.extend(letters)
            self.changed.notify_all()

    def wait(self, done: Any) -> bool:
        with self.changed:
            return self.changed.wait_for(done, WAIT_S)


class FakeClient:
    """The paho client as the writer uses it: only PUBACKs."""

    def __init__(self) -> None:
        self.acked: list[int] = []

    def ack(self, mid: int, qos: int) -> None:
        self.acked.append(mid)


def message(mid: int, seq: int) -> mqtt.MQTTMessage:
    msg = mqtt.MQTTMessage(mid=mid, topic=TOPIC.encode())
    msg.payload = json.dumps(
        [{"schemaVersion": 1, "deviceId": DEVICE, "seq": seq, "time": "2025-06-01T11:00:00Z"}]
    ).encode()
    msg.qos = 1
    return msg


@pytest.fixture
def store(monkeypatch: pytest.MonkeyPatch) -> FakeStore:
    fake = FakeStore()
    monkeypatch.setattr(batch_writer, "store_batch", fake.store_batch)
    monkeypatch.setattr(batch_writer, "store_dead_letters", fake.store_dead_letters)
    return fake


@pytest.fixture
def ingestor() -> Iterator[tuple[TelemetryIngestor, FakeClient]]:
    """An ingestor whose writer runs and whose broker connection is the fake client."""
    running = TelemetryIngestor(
        engine=create_engine("sqlite://"),  # never connected: the fake store stands in
        broker_url="mqtt://127.0.0.1:1",
        flush_interval=0.05,
    )
    client = FakeClient()
    running._client = client  # type: ignore[assignment]
    running._connection = 1
    running._connected.set()
    running._writer = threading.Thread(target=running._run_writer, daemon=True)
    running._writer.start()
    yield running, client
    running._client = None
    assert running.stop()


def test_an_unexpected_store_error_is_counted_dead_lettered_acknowledged_and_ingestion_goes_on(
    store: FakeStore, ingestor: tuple[TelemetryIngestor, FakeClient], caplog: pytest.LogCaptureFixture
) -> None:
    running, client = ingestor
    running._on_message(client, None, message(mid=1, seq=1))  # type: ignore[arg-type]
    assert store.wait(lambda: len(store.letters) == 1)

    for mid in (2, 3):
        running._on_message(client, None, message(mid=mid, seq=mid))  # type: ignore[arg-type]
    assert store.wait(lambda: [r.seq for r in store.records] == [2, 3])

    (letter,) = store.letters
    assert letter.reason == RejectReason.INTERNAL_ERROR.value and "StoreBug" in letter.detail
    assert client.acked == [1, 2, 3]  # the failed batch too: the broker must not resend it
    stats = running.stats()
    assert stats.writer_errors == 1 and stats.internal_error == 1
    assert stats.store_failed == 0 and stats.stored == 2
    assert stats.dead_lettered_by_reason["internal_error"] == 1
    assert running.writer_alive()
    assert "telemetry writer failed on 1 messages" in caplog.text
