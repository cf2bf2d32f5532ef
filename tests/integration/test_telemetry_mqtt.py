"""Telemetry over a real MQTT broker into a real database.

agent Telemetry → Outbox (SQLite) → TelemetryPublisher → broker (Mosquitto started by the test
on a free port, or the EmbeddedBroker) → TelemetryIngestor → make_engine database.

Every wait polls with a deadline; nothing sleeps for a fixed long time.
"""

from __future__ import annotations

import getpass
import json
import os
import shutil
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from sqlalchemy import select
from sqlalchemy.engine import Engine

from agent.stats import InferenceStats
from agent.telemetry import Outbox, Telemetry, TelemetryPublisher
from controlplane.broker import EmbeddedBroker
from controlplane.db.engine import make_engine
from controlplane.db.models import TelemetryRecord
from controlplane.ingest import TelemetryIngestor
from protos.fleet.topics import TopicKind, telemetry_topic

pytestmark = pytest.mark.integration

DEADLINE_S = 60.0


def wait_until(predicate: Callable[[], bool], timeout: float = DEADLINE_S, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


@dataclass
class Mosquitto:
    """A private Mosquitto on a fixed free port that can be stopped and started again."""

    workdir: Path
    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        config = self.workdir / "mosquitto.conf"
        config.write_text(
            # Started as root, Mosquitto would switch to user "mosquitto", which cannot write
            # its persistence file into our temp dir; stay whoever runs the tests.
            f"user {getpass.getuser()}\n"
            f"listener {self.port} 127.0.0.1\n"
            "allow_anonymous true\n"
            "persistence true\n"
            f"persistence_location {self.workdir}/\n"
            "autosave_interval 1\n"
            "max_queued_messages 100000\n"
            f"log_dest file {self.workdir}/mosquitto.log\n"
        )
        binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        self.process = subprocess.Popen([binary, "-c", str(config)], stdin=subprocess.DEVNULL)
        if not wait_until(lambda: port_open(self.port), timeout=15):
            self.stop()
            pytest.fail(f"mosquitto did not listen on {self.port}; see {self.workdir}/mosquitto.log")

    def stop(self) -> None:
        """SIGTERM: Mosquitto saves its persistence file (sessions, queued messages) and exits."""
        if self.process is None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(5)
        self.process = None
        assert wait_until(lambda: not port_open(self.port), timeout=10)


@pytest.fixture
def own_mosquitto(tmp_path: Path) -> Iterator[Mosquitto]:
    """A Mosquitto for this test alone (unlike conftest's shared one) so it can be restarted."""
    if shutil.which("mosquitto") is None and not os.path.exists("/usr/sbin/mosquitto"):
        pytest.fail("mosquitto is not installed: run dev/setup")
    broker = Mosquitto(tmp_path / "mosquitto")
    broker.start()
    yield broker
    broker.stop()


@pytest.fixture
def embedded_broker() -> Iterator[str]:
    broker = EmbeddedBroker()
    url = broker.start()
    yield url
    broker.stop()


@pytest.fixture(params=["mosquitto", "embedded"])
def any_broker(request: pytest.FixtureRequest) -> str:
    """A broker URL; requested before the clients so it is torn down after them."""
    fixture = "own_mosquitto" if request.param == "mosquitto" else "embedded_broker"
    value = request.getfixturevalue(fixture)
    return value.url if isinstance(value, Mosquitto) else str(value)


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[Engine]:
    eng = make_engine(f"sqlite:///{tmp_path / 'controlplane.sqlite3'}")
    yield eng
    eng.dispose()


def _postgres_admin_dsn() -> str:
    return os.environ.get(
        "EDGEFLEET_TEST_POSTGRES_ADMIN", "host=127.0.0.1 port=5432 user=postgres dbname=postgres"
    )


@pytest.fixture
def pg_engine() -> Iterator[Engine]:
    """A throwaway PostgreSQL database; skipped only when no server answers on 127.0.0.1:5432."""
    psycopg = pytest.importorskip("psycopg")
    dsn = _postgres_admin_dsn()
    try:
        admin = psycopg.connect(dsn, autocommit=True, connect_timeout=3)
    except psycopg.OperationalError as exc:
        pytest.skip(f"PostgreSQL not reachable ({exc})")
    name = f"edgefleet_telemetry_{uuid.uuid4().hex[:12]}"
    params = admin.info.get_parameters()
    with admin:
        admin.execute(f'CREATE DATABASE "{name}"')
        user = admin.info.user
        eng = make_engine(f"postgresql+psycopg://{user}@{params.get('host', '127.0.0.1')}:5432/{name}")
        try:
            yield eng
        finally:
            eng.dispose()
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def stored(engine: Engine, device_id: str) -> list[tuple[int, str, dict[str, Any]]]:
    table = TelemetryRecord.__table__  # type: ignore[attr-defined]
    with engine.connect() as conn:
        rows = conn.execute(
            select(table.c.seq, table.c.kind, table.c.payload)
            .where(table.c.device_id == device_id)
            .order_by(table.c.seq)
        ).all()
    return [(int(seq), kind, payload) for seq, kind, payload in rows]


def stats(i: int) -> InferenceStats:
    return InferenceStats(
        model="smollm2",
        endpoint="chat.completions",
        prompt_tokens=10 + i,
        completion_tokens=20,
        latency_ms=100.0 + i,
        time_to_first_token_ms=5.0,
        tokens_per_second=80.0 + i,
        stream=False,
    )


@dataclass
class Agent:
    device_id: str
    outbox: Outbox
    publisher: TelemetryPublisher
    telemetry: Telemetry

    def close(self) -> None:
        self.publisher.stop()
        self.outbox.close()


@pytest.fixture
def make_agent(tmp_path: Path) -> Iterator[Callable[[str], Agent]]:
    agents: list[Agent] = []

    def factory(broker_url: str) -> Agent:
        device_id = f"dev-{uuid.uuid4().hex[:8]}"
        outbox = Outbox(tmp_path / device_id / "telemetry.sqlite3")
        publisher = TelemetryPublisher(device_id=device_id, broker_url=broker_url, outbox=outbox)
        telemetry = Telemetry(device_id=device_id, outbox=outbox, nudge=publisher.nudge)
        agent = Agent(device_id, outbox, publisher, telemetry)
        agents.append(agent)
        return agent

    yield factory
    for agent in agents:
        agent.close()


@pytest.fixture
def make_ingestor() -> Iterator[Callable[..., TelemetryIngestor]]:
    ingestors: list[TelemetryIngestor] = []

    def factory(*, engine: Engine, broker_url: str, client_id: str | None = None) -> TelemetryIngestor:
        ingestor = TelemetryIngestor(
            engine=engine, broker_url=broker_url, client_id=client_id or f"cp-{uuid.uuid4().hex[:8]}"
        )
        ingestor.start()
        ingestors.append(ingestor)
        return ingestor

    yield factory
    for ingestor in ingestors:
        ingestor.stop()


def record_mix(agent: Agent, count: int, offset: int = 0) -> None:
    """``count`` records of all three kinds, as the agent would produce them."""
    for i in range(offset, offset + count):
        if i % 10 == 3:
            agent.telemetry.record_heartbeat(
                state=6,
                active_bundle=("smollm2", 2),
                api_url="http://127.0.0.1:8080",
                rss_bytes=50_000_000,
                uptime_seconds=float(i),
                requests_total=i,
                variant="gguf",
            )
        elif i % 10 == 7:
            agent.telemetry.record_deployment(generation=i, bundle=("smollm2", 2), state=6, detail="ok")
        else:
            agent.telemetry.record_inference(stats(i))


def assert_all_arrived_once(engine: Engine, agent: Agent, expected: int) -> None:
    ok = wait_until(lambda: len(stored(engine, agent.device_id)) >= expected)
    rows = stored(engine, agent.device_id)
    assert ok, f"only {len(rows)} of {expected} records arrived"
    assert [seq for seq, _, _ in rows] == list(range(1, expected + 1))
    assert wait_until(lambda: len(agent.outbox) == 0), f"{len(agent.outbox)} records still in the outbox"


def _end_to_end(broker_url: str, engine: Engine, make_agent: Any, make_ingestor: Any) -> None:
    ingestor = make_ingestor(engine=engine, broker_url=broker_url)
    assert ingestor.wait_subscribed(30)
    agent = make_agent(broker_url)
    agent.publisher.start()
    record_mix(agent, 50)
    assert_all_arrived_once(engine, agent, 50)
    rows = stored(engine, agent.device_id)
    kinds = {kind for _, kind, _ in rows}
    assert kinds == {"inference", "heartbeat", "deployment"}
    first = rows[0][2]
    assert first["deviceId"] == agent.device_id
    assert first["tokensPerSecond"] == 80.0
    assert first["latencyMs"] == 100.0
    assert ingestor.stats().rejected == 0
    assert ingestor.stats().stored >= 50


def test_publisher_to_mosquitto_to_sqlite_exactly_once(
    own_mosquitto: Mosquitto, engine: Engine, make_agent: Any, make_ingestor: Any
) -> None:
    _end_to_end(own_mosquitto.url, engine, make_agent, make_ingestor)


def test_publisher_to_embedded_broker_to_sqlite_exactly_once(
    embedded_broker: str, engine: Engine, make_agent: Any, make_ingestor: Any
) -> None:
    assert embedded_broker.startswith("mqtt://127.0.0.1:")
    _end_to_end(embedded_broker, engine, make_agent, make_ingestor)


def test_publisher_to_mosquitto_to_postgresql_exactly_once(
    own_mosquitto: Mosquitto, pg_engine: Engine, make_agent: Any, make_ingestor: Any
) -> None:
    _end_to_end(own_mosquitto.url, pg_engine, make_agent, make_ingestor)


def test_records_made_while_the_broker_is_down_arrive_once_it_is_back(
    own_mosquitto: Mosquitto, engine: Engine, make_agent: Any, make_ingestor: Any
) -> None:
    ingestor = make_ingestor(engine=engine, broker_url=own_mosquitto.url)
    assert ingestor.wait_subscribed(30)

    # Phase 1: the agent starts while the broker is down; records wait in the outbox.
    own_mosquitto.stop()
    agent = make_agent(own_mosquitto.url)
    agent.publisher.start()
    record_mix(agent, 20)
    assert not agent.publisher.connected
    assert len(agent.outbox) == 20
    own_mosquitto.start()
    assert_all_arrived_once(engine, agent, 20)

    # Phase 2: the broker goes away mid-stream and comes back on the same port.
    record_mix(agent, 10, offset=20)
    own_mosquitto.stop()
    record_mix(agent, 15, offset=30)
    assert len(agent.outbox) >= 15
    own_mosquitto.start()
    assert_all_arrived_once(engine, agent, 45)
    assert ingestor.stats().rejected == 0


def test_ingestor_down_messages_wait_in_its_persistent_session(
    any_broker: str, engine: Engine, make_agent: Any, make_ingestor: Any
) -> None:
    client_id = f"cp-{uuid.uuid4().hex[:8]}"
    first = make_ingestor(engine=engine, broker_url=any_broker, client_id=client_id)
    assert first.wait_subscribed(30)
    first.stop()

    agent = make_agent(any_broker)
    agent.publisher.start()
    record_mix(agent, 30)
    # The broker acknowledged them (outbox empty) though nobody was there to store them.
    assert wait_until(lambda: len(agent.outbox) == 0)
    assert stored(engine, agent.device_id) == []

    make_ingestor(engine=engine, broker_url=any_broker, client_id=client_id)
    assert_all_arrived_once(engine, agent, 30)


def test_outbox_left_over_from_a_previous_run_is_sent_on_start(
    own_mosquitto: Mosquitto, engine: Engine, make_agent: Any, make_ingestor: Any
) -> None:
    ingestor = make_ingestor(engine=engine, broker_url=own_mosquitto.url)
    assert ingestor.wait_subscribed(30)
    agent = make_agent(own_mosquitto.url)
    record_mix(agent, 12)  # publisher not started: as if the agent had crashed before sending
    path = agent.outbox.path
    agent.outbox.close()

    reopened = Outbox(path)
    agent.outbox = reopened
    agent.publisher = TelemetryPublisher(
        device_id=agent.device_id, broker_url=own_mosquitto.url, outbox=reopened
    )
    agent.publisher.start()
    assert_all_arrived_once(engine, agent, 12)


def _raw_client(url: str) -> mqtt.Client:
    port = int(url.rsplit(":", 1)[1])
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"raw-{uuid.uuid4().hex[:8]}")
    client.connect("127.0.0.1", port)
    client.loop_start()
    return client


def _heartbeat_json(device_id: str, seq: int) -> bytes:
    return json.dumps(
        {
            "schemaVersion": 1,
            "deviceId": device_id,
            "seq": str(seq),
            "time": "2025-06-01T12:00:00Z",
            "requestsTotal": "5",
            "someFutureField": {"ignored": True},
        }
    ).encode()


def test_malformed_and_foreign_device_messages_are_rejected_and_counted(
    any_broker: str, engine: Engine, make_ingestor: Any
) -> None:
    ingestor = make_ingestor(engine=engine, broker_url=any_broker)
    assert ingestor.wait_subscribed(30)
    victim, attacker = "dev-victim", "dev-attacker"
    client = _raw_client(any_broker)
    try:
        topic = telemetry_topic(attacker, TopicKind.HEARTBEAT)
        infos = [
            client.publish(topic, b"{not json", qos=1),
            client.publish(topic, b"\xff\xfe", qos=1),
            client.publish(telemetry_topic(attacker, TopicKind.INFERENCE), b'{"seq": "x"}', qos=1),
            # the attacker writes a record claiming to be the victim, on its own topic
            client.publish(topic, _heartbeat_json(victim, 1), qos=1),
            # valid, with an unknown field from a newer schema
            client.publish(topic, _heartbeat_json(attacker, 1), qos=1),
            client.publish("fleet/v1/devices/x/telemetry/unknown-kind", _heartbeat_json("x", 1), qos=1),
        ]
        for info in infos:
            info.wait_for_publish(10)
    finally:
        client.disconnect()
        client.loop_stop()
    assert wait_until(lambda: ingestor.stats().received >= 6 and ingestor.stats().stored >= 1)
    snapshot = ingestor.stats()
    assert snapshot.rejected == 5
    assert snapshot.malformed == 3
    assert snapshot.device_mismatch == 1
    assert snapshot.bad_topic == 1
    assert stored(engine, victim) == []
    rows = stored(engine, attacker)
    assert [(seq, kind) for seq, kind, _ in rows] == [(1, "heartbeat")]
    assert "someFutureField" not in rows[0][2]
    assert rows[0][2]["requestsTotal"] == "5"


def test_duplicate_deliveries_are_stored_once(
    own_mosquitto: Mosquitto, engine: Engine, make_ingestor: Any
) -> None:
    ingestor = make_ingestor(engine=engine, broker_url=own_mosquitto.url)
    assert ingestor.wait_subscribed(30)
    client = _raw_client(own_mosquitto.url)
    try:
        topic = telemetry_topic("dev-dup", TopicKind.HEARTBEAT)
        for _ in range(3):
            for seq in (1, 2):
                client.publish(topic, _heartbeat_json("dev-dup", seq), qos=1).wait_for_publish(10)
    finally:
        client.disconnect()
        client.loop_stop()
    assert wait_until(lambda: ingestor.stats().received >= 6)
    assert wait_until(lambda: ingestor.stats().stored >= 6)
    assert [seq for seq, _, _ in stored(engine, "dev-dup")] == [1, 2]


def test_publisher_and_ingestor_stop_promptly_when_the_broker_is_gone(tmp_path: Path, engine: Engine) -> None:
    url = f"mqtt://127.0.0.1:{free_port()}"  # nothing listens here
    outbox = Outbox(tmp_path / "o.sqlite3")
    publisher = TelemetryPublisher(device_id="dev-lonely", broker_url=url, outbox=outbox)
    telemetry = Telemetry(device_id="dev-lonely", outbox=outbox, nudge=publisher.nudge)
    ingestor = TelemetryIngestor(engine=engine, broker_url=url, client_id="cp-lonely")
    publisher.start()
    ingestor.start()
    assert telemetry.record_inference(stats(1)) == 1
    time.sleep(0.3)  # let both reach paho's reconnect wait
    started = time.monotonic()
    publisher.stop(timeout=2)
    ingestor.stop(timeout=2)
    assert time.monotonic() - started < 8
    assert len(outbox) == 1  # still waiting for a broker
    outbox.close()


def test_embedded_broker_refuses_to_listen_beyond_loopback() -> None:
    with pytest.raises(ValueError, match="loopback"):
        EmbeddedBroker(host="0.0.0.0")
