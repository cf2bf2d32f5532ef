"""Telemetry over a real MQTT broker into a real database.

Outbox (SQLite) → TelemetryPublisher → broker (Mosquitto started by the test on a free port,
MQTT v5; or the EmbeddedBroker, MQTT 3.1.1) → TelemetryIngestor → make_engine database.

Records are put into the outbox directly, as the agent's recorder does, so these tests hold
the transport to account whatever the recorder builds. Every wait polls with a deadline;
nothing sleeps for a fixed long time.
"""

from __future__ import annotations

import getpass
import json
import os
import queue
import shutil
import signal
import socket
import sqlite3
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from sqlalchemy import select
from sqlalchemy.engine import Engine
from sqlmodel import Session

from edgefleet.agent.telemetry import Outbox, TelemetryPublisher
from edgefleet.controlplane.store import devices
from edgefleet.controlplane.store.engine import make_engine
from edgefleet.controlplane.store.models import Device, TelemetryRecord
from edgefleet.controlplane.telemetry.broker import EmbeddedBroker
from edgefleet.controlplane.telemetry.ingest import TelemetryIngestor, replica_client_id
from edgefleet.controlplane.telemetry.retire import retire_replica
from edgefleet.protos.fleet.broker_url import BrokerAddress, configure_client, parse_broker_url
from edgefleet.protos.fleet.topics import (
    TelemetryMessage,
    TopicKind,
    presence_topic,
    status_topic,
    telemetry_topic,
)
from edgefleet.protos.fleet.v1 import common_pb2, telemetry_pb2

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
            "max_packet_size 262144\n"  # as deploy/mosquitto: v5 clients learn it in the CONNACK
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
    """A broker URL, MQTT v5 (Mosquitto) or 3.1.1 (embedded); requested before the clients so
    it is torn down after them."""
    fixture = "own_mosquitto" if request.param == "mosquitto" else "embedded_broker"
    value = request.getfixturevalue(fixture)
    return value.url if isinstance(value, Mosquitto) else str(value)


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[Engine]:
    eng = make_engine(f"sqlite:///{tmp_path / 'controlplane.sqlite3'}")
    yield eng
    eng.dispose()


@pytest.fixture
def pg_engine(postgres_database: str) -> Iterator[Engine]:
    """A throwaway PostgreSQL database (tests/conftest.py)."""
    eng = make_engine(postgres_database)
    yield eng
    eng.dispose()


def stored(engine: Engine, device_id: str) -> list[tuple[int, str, dict[str, Any]]]:
    table = TelemetryRecord.__table__  # type: ignore[attr-defined]
    with engine.connect() as conn:
        rows = conn.execute(
            select(table.c.seq, table.c.kind, table.c.payload)
            .where(table.c.device_id == device_id)
            .order_by(table.c.seq)
        ).all()
    return [(int(seq), kind, payload) for seq, kind, payload in rows]


def enroll(engine: Engine, device_id: str) -> None:
    with Session(engine) as s, s.begin():
        devices.create_device(s, device_id=device_id, hostname=device_id, labels={})


def device_row(engine: Engine, device_id: str) -> Device:
    with Session(engine) as s:
        row = s.get(Device, device_id)
        assert row is not None
        return row


# records, as the agent's recorder makes them ---------------------------------------------------


def stamped(message: TelemetryMessage, device_id: str) -> TelemetryMessage:
    message.schema_version = telemetry_pb2.TELEMETRY_SCHEMA_V1
    message.device_id = device_id
    message.time.FromDatetime(datetime.now(UTC))
    return message


def summary(i: int) -> telemetry_pb2.InferenceSummary:
    return telemetry_pb2.InferenceSummary(
        model="smollm2",
        bundle=common_pb2.BundleRef(name="smollm2", version=2),
        variant="gguf-q4_1",
        requests=3,
        requests_by_endpoint={"chat.completions": 3},
        prompt_tokens=10 + i,
        completion_tokens=20,
        latency_ms_p50=90.0,
        latency_ms_p95=100.0 + i,
        tokens_per_second=80.0 + i,
    )


@dataclass
class Agent:
    device_id: str
    outbox: Outbox
    publisher: TelemetryPublisher

    def put(self, kind: TopicKind, message: TelemetryMessage) -> int:
        seq = self.outbox.put(kind, stamped(message, self.device_id))
        self.publisher.nudge()
        return seq

    def close(self) -> None:
        self.publisher.stop()
        self.outbox.close()


def record_mix(agent: Agent, count: int, offset: int = 0) -> None:
    """``count`` records of all three kinds, as the agent would produce them."""
    for i in range(offset, offset + count):
        if i % 10 == 3:
            agent.put(
                TopicKind.HEARTBEAT,
                telemetry_pb2.Heartbeat(
                    state=common_pb2.DEVICE_STATE_ACTIVE,
                    api_url="http://127.0.0.1:8080",
                    rss_bytes=50_000_000,
                    uptime_seconds=float(i),
                    requests_total=i,
                    records_produced=i + 1,
                ),
            )
        elif i % 10 == 7:
            agent.put(
                TopicKind.DEPLOYMENT,
                telemetry_pb2.DeploymentEvent(
                    generation=i, state=common_pb2.DEVICE_STATE_ACTIVE, detail="ok"
                ),
            )
        else:
            agent.put(TopicKind.INFERENCE, summary(i))


@pytest.fixture
def make_agent(tmp_path: Path) -> Iterator[Callable[..., Agent]]:
    agents: list[Agent] = []

    def factory(broker_url: str, *, device_id: str | None = None, **publisher: Any) -> Agent:
        device_id = device_id or f"dev-{uuid.uuid4().hex[:8]}"
        outbox = Outbox(tmp_path / device_id / "telemetry.sqlite3")
        agent = Agent(
            device_id,
            outbox,
            TelemetryPublisher(device_id=device_id, broker_url=broker_url, outbox=outbox, **publisher),
        )
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


def assert_all_arrived_once(engine: Engine, agent: Agent, expected: int, timeout: float = DEADLINE_S) -> None:
    ok = wait_until(lambda: len(stored(engine, agent.device_id)) >= expected, timeout=timeout)
    rows = stored(engine, agent.device_id)
    assert ok, f"only {len(rows)} of {expected} records arrived"
    assert [seq for seq, _, _ in rows] == list(range(1, expected + 1))
    assert wait_until(lambda: len(agent.outbox) == 0), f"{len(agent.outbox)} records still in the outbox"


# a plain MQTT client to watch or forge traffic -----------------------------------------------------


class Watcher:
    """A client on the broker's own MQTT version that keeps every message it receives."""

    def __init__(self, url: str) -> None:
        address: BrokerAddress = parse_broker_url(url)
        self.v5 = address.v5
        client_id = f"watch-{uuid.uuid4().hex[:8]}"
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=address.protocol)
        self.messages: queue.Queue[mqtt.MQTTMessage] = queue.Queue()
        self.subscribed = threading.Event()
        self.client.on_message = lambda _c, _u, message: self.messages.put(message)
        self.client.on_subscribe = lambda *_: self.subscribed.set()
        configure_client(self.client, address)  # the embedded broker's URL carries its password
        self.client.connect(address.host, address.port)
        self.client.loop_start()

    def subscribe(self, topic: str) -> None:
        self.subscribed.clear()
        self.client.subscribe(topic, qos=1)
        assert self.subscribed.wait(10)

    def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> None:
        self.client.publish(topic, payload, qos=1, retain=retain).wait_for_publish(10)

    def next(self, timeout: float = 15.0) -> mqtt.MQTTMessage:
        return self.messages.get(timeout=timeout)

    def until(self, predicate: Callable[[Any], bool], timeout: float = 15.0) -> list[Any]:
        """JSON bodies of the messages received up to the first that ``predicate`` accepts."""
        bodies: list[Any] = []
        deadline = time.monotonic() + timeout
        while not bodies or not predicate(bodies[-1]):
            try:
                bodies.append(
                    json.loads(self.messages.get(timeout=max(0.0, deadline - time.monotonic())).payload)
                )
            except queue.Empty:
                raise AssertionError(f"no matching message; got {bodies}") from None
        return bodies

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def watch() -> Iterator[Callable[[str], Watcher]]:
    watchers: list[Watcher] = []

    def factory(url: str) -> Watcher:
        watchers.append(Watcher(url))
        return watchers[-1]

    yield factory
    for watcher in watchers:
        watcher.close()


def cut_connection(publisher: TelemetryPublisher) -> None:
    """Ends the publisher's TCP connection under paho, without a DISCONNECT: to the broker it is
    a device that lost its network, so the broker publishes its Last Will; paho reconnects."""
    client = publisher._client  # reaching under the publisher on purpose
    assert client is not None
    sock = client.socket()
    assert sock is not None
    sock.shutdown(socket.SHUT_RDWR)


# end to end -------------------------------------------------------------------------------------


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
    assert first["latencyMsP95"] == 100.0
    assert first["requestsByEndpoint"] == {"chat.completions": "3"}
    assert ingestor.stats().rejected == 0
    assert ingestor.stats().rows >= 50


def test_publisher_to_mosquitto_to_sqlite_exactly_once(
    own_mosquitto: Mosquitto, engine: Engine, make_agent: Any, make_ingestor: Any
) -> None:
    _end_to_end(own_mosquitto.url, engine, make_agent, make_ingestor)


def test_publisher_to_embedded_broker_to_sqlite_exactly_once(
    embedded_broker: str, engine: Engine, make_agent: Any, make_ingestor: Any
) -> None:
    assert embedded_broker.startswith("mqtt://edgefleet-controlplane:")
    assert embedded_broker.endswith("?protocol=3.1.1")
    assert parse_broker_url(embedded_broker).host == "127.0.0.1"
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


def test_after_a_broker_restart_records_wait_in_the_outbox_until_the_control_plane_is_back(
    own_mosquitto: Mosquitto, engine: Engine, make_agent: Any, make_ingestor: Any
) -> None:
    """Mosquitto 2.0.11 does not restore shared subscriptions from its persistence file, so after
    a restart nobody subscribes until the replicas are back, and a v5 PUBACK says so (0x10, no
    matching subscribers). The records wait in the outbox instead of vanishing in the broker."""
    client_id = f"cp-{uuid.uuid4().hex[:8]}"
    first = make_ingestor(engine=engine, broker_url=own_mosquitto.url, client_id=client_id)
    assert first.wait_subscribed(30)
    first.stop()
    own_mosquitto.stop()
    own_mosquitto.start()

    agent = make_agent(own_mosquitto.url)
    agent.publisher.start()
    record_mix(agent, 20)
    assert wait_until(lambda: agent.publisher.published > 8)  # sent, told "nobody", sent again
    assert len(agent.outbox) == 20
    assert agent.publisher.acknowledged == 0

    make_ingestor(engine=engine, broker_url=own_mosquitto.url, client_id=client_id)
    assert_all_arrived_once(engine, agent, 20)


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


# batching ---------------------------------------------------------------------------------------


def test_a_backlog_arrives_in_far_fewer_messages_than_records(
    any_broker: str, engine: Engine, make_agent: Any, make_ingestor: Any
) -> None:
    ingestor = make_ingestor(engine=engine, broker_url=any_broker)
    assert ingestor.wait_subscribed(30)
    agent = make_agent(any_broker)
    backlog = 2000
    for i in range(backlog):  # one kind, as after an outage with only metrics queued
        agent.outbox.put(TopicKind.INFERENCE, stamped(summary(i), agent.device_id))
    started = time.monotonic()
    agent.publisher.start()
    assert_all_arrived_once(engine, agent, backlog)
    elapsed = time.monotonic() - started
    snapshot = ingestor.stats()
    print(
        f"\nbacklog of {backlog} records: {agent.publisher.published} messages, "
        f"{snapshot.stored} stored, {elapsed:.2f} s ({backlog / elapsed:.0f} records/s)"
    )
    assert agent.publisher.published <= backlog // 50  # 100 records a message, minus stragglers
    assert snapshot.stored <= backlog // 50
    assert snapshot.rows == agent.publisher.acknowledged == backlog
    assert snapshot.rejected == 0


def test_a_message_stays_within_the_byte_limit(own_mosquitto: Mosquitto, watch: Any, make_agent: Any) -> None:
    agent = make_agent(own_mosquitto.url, max_batch_bytes=4096)
    watcher = watch(own_mosquitto.url)
    watcher.subscribe(telemetry_topic(agent.device_id, TopicKind.INFERENCE))
    for i in range(60):
        agent.outbox.put(TopicKind.INFERENCE, stamped(summary(i), agent.device_id))
    agent.publisher.start()
    seqs: list[int] = []
    while len(seqs) < 60:
        message = watcher.next()
        assert len(message.payload) <= 4096
        seqs.extend(int(record["seq"]) for record in json.loads(message.payload))
    assert seqs == list(range(1, 61))


# MQTT v5 properties --------------------------------------------------------------------------------


def test_metrics_carry_a_message_expiry_and_deployment_events_none(
    own_mosquitto: Mosquitto, watch: Any, make_agent: Any
) -> None:
    agent = make_agent(own_mosquitto.url, message_expiry_s=3600)
    watcher = watch(own_mosquitto.url)
    watcher.subscribe(f"fleet/v1/devices/{agent.device_id}/telemetry/+")
    agent.publisher.start()
    record_mix(agent, 10)  # inference, heartbeat and deployment records
    expiry: dict[str, int | None] = {}
    while len(expiry) < 3:
        message = watcher.next()
        kind = message.topic.rsplit("/", 1)[1]
        expiry[kind] = getattr(message.properties, "MessageExpiryInterval", None)
    assert expiry["deployment"] is None
    for kind in ("inference", "heartbeat"):
        remaining = expiry[kind]
        assert remaining is not None and 3500 < remaining <= 3600, expiry


def test_the_broker_drops_expired_metrics_but_keeps_deployment_events(
    own_mosquitto: Mosquitto, engine: Engine, make_agent: Any, make_ingestor: Any
) -> None:
    """What the expiry is for: metrics older than it are not worth delivering to a control
    plane that was away that long; deployment events always are."""
    client_id = f"cp-{uuid.uuid4().hex[:8]}"
    first = make_ingestor(engine=engine, broker_url=own_mosquitto.url, client_id=client_id)
    assert first.wait_subscribed(30)
    first.stop()
    agent = make_agent(own_mosquitto.url, message_expiry_s=1)
    agent.publisher.start()
    record_mix(agent, 10)
    assert wait_until(lambda: len(agent.outbox) == 0)
    time.sleep(2.5)  # past the expiry, while the control plane is away
    make_ingestor(engine=engine, broker_url=own_mosquitto.url, client_id=client_id)
    assert wait_until(lambda: len(stored(engine, agent.device_id)) >= 1)
    time.sleep(1.0)  # anything else queued would have followed the first at once
    assert [kind for _, kind, _ in stored(engine, agent.device_id)] == ["deployment"]


# presence and status -------------------------------------------------------------------------------


def test_the_last_will_says_offline_and_a_reconnect_says_online(
    any_broker: str, watch: Any, make_agent: Any
) -> None:
    agent = make_agent(any_broker)
    watcher = watch(any_broker)
    watcher.subscribe(presence_topic(agent.device_id))
    agent.publisher.start()
    assert agent.publisher.wait_connected(30)
    online = watcher.until(lambda body: body["online"])
    assert online[-1]["reason"] == "connected" and online[-1]["time"]

    cut_connection(agent.publisher)
    will = watcher.until(lambda body: not body["online"])[-1]
    assert will["reason"] == "connection lost"
    assert "time" not in will  # the broker sends it whenever the connection dies
    back = watcher.until(lambda body: body["online"])[-1]
    assert back["reason"] == "connected"

    # retained: whoever subscribes later learns the latest at once
    late = watch(any_broker)
    late.subscribe(presence_topic(agent.device_id))
    assert late.until(lambda _: True)[-1]["online"] is True


def test_a_clean_stop_says_agent_stopped(any_broker: str, watch: Any, make_agent: Any) -> None:
    agent = make_agent(any_broker)
    watcher = watch(any_broker)
    watcher.subscribe(presence_topic(agent.device_id))
    agent.publisher.start()
    watcher.until(lambda body: body["online"])
    agent.publisher.stop()
    bodies = watcher.until(lambda body: not body["online"])
    assert bodies[-1]["reason"] == "agent stopped" and bodies[-1]["time"]
    time.sleep(0.5)
    assert watcher.messages.empty(), "the Last Will followed a clean stop"


def test_status_is_retained_and_published_again_after_a_reconnect(
    any_broker: str, watch: Any, make_agent: Any
) -> None:
    agent = make_agent(any_broker)
    watcher = watch(any_broker)
    watcher.subscribe(status_topic(agent.device_id))
    agent.publisher.set_status(telemetry_pb2.DeviceStatus(state=common_pb2.DEVICE_STATE_IDLE))  # before start
    agent.publisher.start()
    first = watcher.until(lambda _: True)[-1]
    assert (first["deviceId"], first["state"], first["schemaVersion"]) == (
        agent.device_id,
        "DEVICE_STATE_IDLE",
        1,
    )

    agent.publisher.set_status(
        telemetry_pb2.DeviceStatus(
            state=common_pb2.DEVICE_STATE_ACTIVE, applied_generation=3, api_url="http://x"
        )
    )
    assert watcher.until(lambda _: True)[-1]["state"] == "DEVICE_STATE_ACTIVE"

    cut_connection(agent.publisher)
    again = watcher.until(lambda _: True)[-1]  # only the latest, never the older one
    assert (again["state"], again["appliedGeneration"]) == ("DEVICE_STATE_ACTIVE", "3")

    late = watch(any_broker)
    late.subscribe(status_topic(agent.device_id))
    assert late.until(lambda _: True)[-1]["state"] == "DEVICE_STATE_ACTIVE"
    with pytest.raises(ValueError, match="status of"):
        agent.publisher.set_status(telemetry_pb2.DeviceStatus(device_id="someone-else"))


def test_presence_and_status_reach_the_database(
    any_broker: str, engine: Engine, make_agent: Any, make_ingestor: Any
) -> None:
    ingestor = make_ingestor(engine=engine, broker_url=any_broker)
    assert ingestor.wait_subscribed(30)
    agent = make_agent(any_broker)
    enroll(engine, agent.device_id)
    agent.publisher.set_status(telemetry_pb2.DeviceStatus(state=common_pb2.DEVICE_STATE_ACTIVE))
    agent.publisher.start()
    assert wait_until(lambda: device_row(engine, agent.device_id).online)
    assert wait_until(lambda: ingestor.stats().status >= 1)
    online_at = device_row(engine, agent.device_id).presence_at

    cut_connection(agent.publisher)
    assert wait_until(lambda: ingestor.stats().presence >= 3)  # online, the will, online again
    assert wait_until(lambda: device_row(engine, agent.device_id).online)
    assert device_row(engine, agent.device_id).presence_at > online_at  # type: ignore[operator]

    agent.publisher.stop()
    assert wait_until(lambda: not device_row(engine, agent.device_id).online)
    assert device_row(engine, agent.device_id).last_seen is not None
    assert ingestor.stats().rejected == 0


# several control-plane replicas ------------------------------------------------------------------


def test_two_replicas_share_the_stream_and_store_every_record_once(
    own_mosquitto: Mosquitto, pg_engine: Engine, make_agent: Any, make_ingestor: Any
) -> None:
    replicas = [
        make_ingestor(engine=pg_engine, broker_url=own_mosquitto.url, client_id=f"cp-{r}") for r in "ab"
    ]
    assert all(replica.wait_subscribed(30) for replica in replicas)
    agent = make_agent(own_mosquitto.url, max_batch_records=5)
    agent.publisher.start()
    record_mix(agent, 600)
    assert_all_arrived_once(pg_engine, agent, 600)
    shares = [replica.stats() for replica in replicas]
    print(f"\nshared subscription: replica a stored {shares[0].rows} rows, replica b {shares[1].rows}")
    assert all(share.stored > 0 for share in shares), shares
    assert sum(share.rows for share in shares) == 600  # no message went to both


def test_a_replica_stopped_while_records_flow_loses_nothing(
    own_mosquitto: Mosquitto, engine: Engine, make_agent: Any, make_ingestor: Any
) -> None:
    """A stopped replica keeps its persistent session, and Mosquitto keeps routing its share of
    the shared subscription there: that share waits for it, and arrives once it is back."""
    a = make_ingestor(engine=engine, broker_url=own_mosquitto.url, client_id="cp-a")
    b = make_ingestor(engine=engine, broker_url=own_mosquitto.url, client_id="cp-b")
    assert a.wait_subscribed(30) and b.wait_subscribed(30)
    agent = make_agent(own_mosquitto.url, max_batch_records=3)
    agent.publisher.start()
    total = 300
    for i in range(total):
        record_mix(agent, 1, offset=i)
        if i == total // 3:
            b.stop()  # while records flow
        time.sleep(0.005)
    assert wait_until(lambda: len(agent.outbox) == 0)  # the broker has them all
    held = total - len(stored(engine, agent.device_id))
    make_ingestor(engine=engine, broker_url=own_mosquitto.url, client_id="cp-b")
    assert_all_arrived_once(engine, agent, total)
    print(f"\nreplica stopped mid-stream: {held} of {total} records waited in its session until it was back")


def test_retiring_a_replica_stores_its_share_and_the_broker_stops_keeping_one(
    own_mosquitto: Mosquitto, engine: Engine, make_agent: Any, make_ingestor: Any
) -> None:
    """fleetctl retire-replica: the share a stopped replica's session holds is stored, and once
    its session is ended every later record goes to the replicas still running."""
    a = make_ingestor(engine=engine, broker_url=own_mosquitto.url, client_id=replica_client_id("a"))
    b = make_ingestor(engine=engine, broker_url=own_mosquitto.url, client_id=replica_client_id("b"))
    assert a.wait_subscribed(30) and b.wait_subscribed(30)
    b.stop()  # out of service for good, session kept
    agent = make_agent(own_mosquitto.url, max_batch_records=1)
    agent.publisher.start()
    record_mix(agent, 60)
    assert wait_until(lambda: len(agent.outbox) == 0)  # the broker has them all
    held = 60 - len(stored(engine, agent.device_id))
    assert held > 0  # b's share, waiting in its session

    retired = retire_replica(engine, own_mosquitto.url, "b", quiet_s=1.0)
    assert retired.client_id == "edgefleet-controlplane-b"
    assert retired.stats.rows == held
    assert_all_arrived_once(engine, agent, 60)

    record_mix(agent, 40, offset=60)  # nothing is routed to b's session any more
    assert_all_arrived_once(engine, agent, 100)
    print(f"\nretired replica b: {held} of 60 records came from its session")


def test_fleetctl_retire_replica_reports_what_it_stored(own_mosquitto: Mosquitto, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from edgefleet.controlplane.cli.main import app as fleetctl

    args = [
        "retire-replica",
        "gone",
        "--mqtt",
        own_mosquitto.url,
        "--data-dir",
        str(tmp_path),
        "--quiet",
        "0.5",
    ]
    result = CliRunner().invoke(fleetctl, args)
    assert result.exit_code == 0, result.output
    assert "retired edgefleet-controlplane-gone: stored 0 records from 0 messages" in result.output
    refused = CliRunner().invoke(fleetctl, ["retire-replica", "has space", "--mqtt", own_mosquitto.url])
    assert refused.exit_code != 0 and "printable characters without spaces" in refused.output


def test_retiring_needs_mqtt_v5(embedded_broker: str, engine: Engine) -> None:
    with pytest.raises(ValueError, match="MQTT v5"):
        retire_replica(engine, embedded_broker, "b")


# what devices and strangers cannot do ---------------------------------------------------------------


def _heartbeats_json(device_id: str, *seqs: int) -> bytes:
    return json.dumps(
        [
            {
                "schemaVersion": 1,
                "deviceId": device_id,
                "seq": str(seq),
                "time": "2025-06-01T12:00:00Z",
                "requestsTotal": "5",
                "someFutureField": {"ignored": True},
            }
            for seq in seqs
        ]
    ).encode()


def test_malformed_and_foreign_device_messages_are_rejected_and_counted(
    any_broker: str, engine: Engine, make_ingestor: Any, watch: Any
) -> None:
    ingestor = make_ingestor(engine=engine, broker_url=any_broker)
    assert ingestor.wait_subscribed(30)
    victim, attacker = "dev-victim", "dev-attacker"
    client = watch(any_broker)
    topic = telemetry_topic(attacker, TopicKind.HEARTBEAT)
    client.publish(topic, b"[{not json")
    client.publish(topic, b"\xff\xfe")
    client.publish(telemetry_topic(attacker, TopicKind.INFERENCE), b'[{"seq": "x"}]')
    client.publish(topic, _heartbeats_json(attacker, 1)[:-1] + b', "not a record"]')  # one bad element
    # the attacker writes a record claiming to be the victim, on its own topic, among its own
    client.publish(topic, _heartbeats_json(attacker, 2)[:-1] + b"," + _heartbeats_json(victim, 1)[1:])
    client.publish(presence_topic(attacker), b'{"deviceId": "dev-victim", "online": true}')
    # valid, with an unknown field from a newer schema
    client.publish(topic, _heartbeats_json(attacker, 1, 2))
    client.publish("fleet/v1/devices/x/telemetry/unknown-kind", _heartbeats_json("x", 1))
    assert wait_until(lambda: ingestor.stats().received >= 8 and ingestor.stats().stored >= 1)
    snapshot = ingestor.stats()
    assert (snapshot.rejected, snapshot.malformed, snapshot.device_mismatch, snapshot.bad_topic) == (
        7,
        4,
        2,
        1,
    )
    assert stored(engine, victim) == []
    rows = stored(engine, attacker)
    assert [(seq, kind) for seq, kind, _ in rows] == [(1, "heartbeat"), (2, "heartbeat")]
    assert "someFutureField" not in rows[0][2]
    assert rows[0][2]["requestsTotal"] == "5"


def test_duplicate_deliveries_are_stored_once(
    own_mosquitto: Mosquitto, engine: Engine, make_ingestor: Any, watch: Any
) -> None:
    ingestor = make_ingestor(engine=engine, broker_url=own_mosquitto.url)
    assert ingestor.wait_subscribed(30)
    client = watch(own_mosquitto.url)
    topic = telemetry_topic("dev-dup", TopicKind.HEARTBEAT)
    for _ in range(3):
        client.publish(topic, _heartbeats_json("dev-dup", 1, 2))
        client.publish(topic, _heartbeats_json("dev-dup", 2))
    assert wait_until(lambda: ingestor.stats().received >= 6)
    assert wait_until(lambda: ingestor.stats().stored >= 6)
    assert ingestor.stats().rows == 9
    assert [seq for seq, _, _ in stored(engine, "dev-dup")] == [1, 2]


def test_publisher_and_ingestor_stop_promptly_when_the_broker_is_gone(tmp_path: Path, engine: Engine) -> None:
    url = f"mqtt://127.0.0.1:{free_port()}"  # nothing listens here
    outbox = Outbox(tmp_path / "o.sqlite3")
    publisher = TelemetryPublisher(device_id="dev-lonely", broker_url=url, outbox=outbox)
    ingestor = TelemetryIngestor(engine=engine, broker_url=url, client_id="cp-lonely")
    publisher.start()
    ingestor.start()
    assert outbox.put(TopicKind.INFERENCE, stamped(summary(1), "dev-lonely")) == 1
    publisher.nudge()
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


def test_a_stalled_database_holds_the_backlog_in_the_broker_not_in_memory(
    own_mosquitto: Mosquitto, tmp_path: Path, make_agent: Any
) -> None:
    """While writes cannot commit, the ingestor takes at most twice its batch from the broker
    (its queue fills, its network thread stops reading, TCP holds back the rest) even though
    Mosquitto 2.0.11 stops honouring Receive Maximum; once the database is back, everything
    arrives exactly once."""
    path = tmp_path / "stalled.sqlite3"
    engine = make_engine(f"sqlite:///{path}")
    agent = make_agent(own_mosquitto.url, max_batch_records=1)  # a message per record
    enroll(engine, agent.device_id)
    ingestor = TelemetryIngestor(
        engine=engine, broker_url=own_mosquitto.url, client_id=f"cp-{uuid.uuid4().hex[:8]}", batch_size=5
    )
    blocker = sqlite3.connect(path, isolation_level=None)
    try:
        ingestor.start()
        assert ingestor.wait_subscribed(30)
        blocker.execute("BEGIN EXCLUSIVE")  # the ingestor's writes now wait (and retry)
        for i in range(300):
            agent.outbox.put(TopicKind.INFERENCE, stamped(summary(i), agent.device_id))
        agent.publisher.start()
        assert wait_until(lambda: agent.publisher.acknowledged >= 200)  # the broker holds them
        time.sleep(1.0)
        # 10 queued, 5 in the writer's hands, 1 in the network thread waiting for room
        assert ingestor.stats().received <= 16
        blocker.execute("ROLLBACK")
        assert_all_arrived_once(engine, agent, 300)
        assert ingestor.stats().rows == 300
    finally:
        blocker.close()
        ingestor.stop()
        engine.dispose()
