"""A message the database cannot store never stops ingestion, through a real Mosquitto into
SQLite and PostgreSQL: it is refused (or isolated when only the database refuses it),
acknowledged, counted and kept in the dead-letter table, and later messages of other devices
are stored, also after the ingestor restarts (the poison is not redelivered)."""

from __future__ import annotations

import getpass
import json
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from sqlalchemy import select, text
from sqlalchemy.engine import Engine

from edgefleet.controlplane.store.engine import make_engine
from edgefleet.controlplane.store.models import TelemetryDeadLetter
from edgefleet.controlplane.telemetry.decode import MAX_MESSAGE_BYTES
from edgefleet.controlplane.telemetry.inbox import EXCERPT_BYTES
from edgefleet.controlplane.telemetry.ingest import TelemetryIngestor
from edgefleet.protos.fleet.topics import TopicKind, telemetry_topic
from tests.integration.test_telemetry_mqtt import (
    Mosquitto,
    enroll,
    own_mosquitto,
    port_open,
    stored,
    wait_until,
)

pytestmark = pytest.mark.integration

__all__ = ["own_mosquitto"]  # the fixture, used by name


@pytest.fixture(params=["sqlite", "postgres"])
def db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Engine]:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'controlplane.sqlite3'}"
    else:
        url = str(request.getfixturevalue("postgres_database"))
    engine = make_engine(url)
    yield engine
    engine.dispose()


def heartbeats(device_id: str, *seqs: int | str) -> bytes:
    return json.dumps(
        [{"schemaVersion": 1, "deviceId": device_id, "seq": s, "time": "2025-06-01T11:00:00Z"} for s in seqs]
    ).encode()


class Publisher:
    """A plain MQTT v5 client publishing at QoS 1 and waiting for each PUBACK."""

    def __init__(self, url: str) -> None:
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=f"pub-{uuid.uuid4().hex[:8]}",
            protocol=MQTTProtocolVersion.MQTTv5,
        )
        host, port = url.removeprefix("mqtt://").split(":")
        self.client.connect(host, int(port))
        self.client.loop_start()

    def publish(self, topic: str, payload: bytes) -> None:
        info = self.client.publish(topic, payload, qos=1)
        info.wait_for_publish(15)
        assert info.is_published()

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def publisher(own_mosquitto: Mosquitto) -> Iterator[Publisher]:
    client = Publisher(own_mosquitto.url)
    yield client
    client.close()


def dead_letters(engine: Engine) -> list[Any]:
    table = TelemetryDeadLetter.__table__  # type: ignore[attr-defined]
    with engine.connect() as conn:
        return list(conn.execute(select(table).order_by(table.c.id)).all())


def test_a_seq_beyond_bigint_is_dead_lettered_and_ingestion_goes_on_across_a_restart(
    own_mosquitto: Mosquitto, db: Engine, publisher: Publisher
) -> None:
    client_id = f"cp-{uuid.uuid4().hex[:8]}"
    ingestor = TelemetryIngestor(engine=db, broker_url=own_mosquitto.url, client_id=client_id)
    ingestor.start()
    try:
        assert ingestor.wait_subscribed(30)
        for device in ("dev-a", "dev-b", "dev-poison"):
            enroll(db, device)
        publisher.publish(telemetry_topic("dev-poison", TopicKind.HEARTBEAT), heartbeats("dev-poison", 2**63))
        publisher.publish(telemetry_topic("dev-a", TopicKind.HEARTBEAT), heartbeats("dev-a", 1, 2))
        assert wait_until(lambda: len(stored(db, "dev-a")) == 2)
        assert wait_until(lambda: len(dead_letters(db)) == 1)
        stats = ingestor.stats()
        assert stats.out_of_range == 1 and stats.dead_lettered_by_reason["out_of_range"] == 1
        assert stats.writer_errors == 0 and ingestor.writer_alive()
    finally:
        assert ingestor.stop()
    (letter,) = dead_letters(db)
    assert (letter.device_id, letter.reason) == ("dev-poison", "out_of_range")
    assert f"$.seq = {2**63}" in letter.detail and letter.excerpt == heartbeats("dev-poison", 2**63)

    # The poison was acknowledged: the same session, resumed, gets only what came after.
    publisher.publish(telemetry_topic("dev-b", TopicKind.HEARTBEAT), heartbeats("dev-b", 1))
    again = TelemetryIngestor(engine=db, broker_url=own_mosquitto.url, client_id=client_id)
    again.start()
    try:
        assert wait_until(lambda: len(stored(db, "dev-b")) == 1)
        assert again.stats().received == 1 and again.stats().rejected == 0
    finally:
        again.stop()
    assert len(dead_letters(db)) == 1
    assert stored(db, "dev-poison") == []


def refuse_seq_666(engine: Engine) -> None:
    """A trigger that makes the database itself refuse one record, whatever ingestion checks."""
    with engine.begin() as conn:
        if engine.dialect.name == "sqlite":
            conn.execute(
                text(
                    "CREATE TRIGGER refuse BEFORE INSERT ON telemetryrecord WHEN NEW.seq = 666 "
                    "BEGIN SELECT RAISE(ABORT, 'refused'); END"
                )
            )
        else:
            conn.execute(
                text(
                    "CREATE FUNCTION refuse() RETURNS trigger AS $$ BEGIN IF NEW.seq = 666 THEN "
                    "RAISE EXCEPTION 'refused' USING ERRCODE = '22023'; END IF; RETURN NEW; END $$ "
                    "LANGUAGE plpgsql"
                )
            )
            conn.execute(
                text(
                    "CREATE TRIGGER refuse BEFORE INSERT ON telemetryrecord "
                    "FOR EACH ROW EXECUTE FUNCTION refuse()"
                )
            )


def test_a_message_the_database_refuses_is_isolated_from_its_batch(
    own_mosquitto: Mosquitto, db: Engine, publisher: Publisher
) -> None:
    for device in ("dev-a", "dev-b"):
        enroll(db, device)
    refuse_seq_666(db)
    # Published while no ingestor runs, so they arrive together and are written as one batch.
    client_id = f"cp-{uuid.uuid4().hex[:8]}"
    first = TelemetryIngestor(engine=db, broker_url=own_mosquitto.url, client_id=client_id)
    first.start()
    assert first.wait_subscribed(30)
    first.stop()
    for seq in range(1, 6):
        publisher.publish(telemetry_topic("dev-a", TopicKind.HEARTBEAT), heartbeats("dev-a", seq))
    publisher.publish(telemetry_topic("dev-b", TopicKind.HEARTBEAT), heartbeats("dev-b", 666))
    for seq in range(6, 11):
        publisher.publish(telemetry_topic("dev-a", TopicKind.HEARTBEAT), heartbeats("dev-a", seq))

    ingestor = TelemetryIngestor(engine=db, broker_url=own_mosquitto.url, client_id=client_id)
    ingestor.start()
    try:
        assert wait_until(lambda: len(stored(db, "dev-a")) == 10 and len(dead_letters(db)) == 1)
        assert ingestor.stats().store_failed == 1
        assert ingestor.stats().dead_lettered_by_reason["store_failed"] == 1
    finally:
        assert ingestor.stop()
    (letter,) = dead_letters(db)
    assert (letter.device_id, letter.reason) == ("dev-b", "store_failed")
    assert stored(db, "dev-b") == []


class UnlimitedMosquitto(Mosquitto):
    """The test Mosquitto without its max_packet_size."""

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        config = self.workdir / "mosquitto.conf"
        config.write_text(
            f"user {getpass.getuser()}\nlistener {self.port} 127.0.0.1\nallow_anonymous true\n"
            f"log_dest file {self.workdir}/mosquitto.log\n"
        )
        binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        self.process = subprocess.Popen([binary, "-c", str(config)], stdin=subprocess.DEVNULL)
        assert wait_until(lambda: port_open(self.port), timeout=15)


def test_an_oversized_message_is_refused_before_decoding_and_kept_as_an_excerpt(
    tmp_path: Path, db: Engine
) -> None:
    """Mosquitto here has no packet limit, as a misconfigured broker would not: the ingestor's
    own check is what refuses the message."""
    broker = UnlimitedMosquitto(tmp_path / "unlimited")
    broker.start()
    client = Publisher(broker.url)
    ingestor = TelemetryIngestor(engine=db, broker_url=broker.url, client_id=f"cp-{uuid.uuid4().hex[:8]}")
    try:
        enroll(db, "dev-a")
        ingestor.start()
        assert ingestor.wait_subscribed(30)
        huge = b"[" + b" " * (MAX_MESSAGE_BYTES + 1000) + b"]"
        client.publish(telemetry_topic("dev-a", TopicKind.HEARTBEAT), huge)
        client.publish(telemetry_topic("dev-a", TopicKind.HEARTBEAT), heartbeats("dev-a", 1))
        assert wait_until(lambda: len(stored(db, "dev-a")) == 1 and len(dead_letters(db)) == 1)
        assert ingestor.stats().oversized == 1
    finally:
        ingestor.stop()
        client.close()
        broker.stop()
    (letter,) = dead_letters(db)
    assert letter.reason == "oversized" and letter.payload_bytes == len(huge)
    assert letter.excerpt == huge[:EXCERPT_BYTES]
