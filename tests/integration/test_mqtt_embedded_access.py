"""The embedded broker admits clients as deploy/mosquitto does: devices by the certificate the
fleet CA gave them, confined to their own topics; the control plane by its password; nobody
else. The ingestor survives a client-id takeover and keeps storing. Real amqtt, real sockets,
the agent's own TelemetryPublisher."""

from __future__ import annotations

import queue
import socket
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from sqlalchemy.engine import Engine

from edgefleet.agent.telemetry import Outbox, TelemetryPublisher
from edgefleet.controlplane.store.engine import make_engine
from edgefleet.controlplane.telemetry.broker import CONTROL_USER, DeviceTls, EmbeddedBroker
from edgefleet.controlplane.telemetry.ingest import TelemetryIngestor
from edgefleet.controlplane.trust.ca import CertificateAuthority, init_ca
from edgefleet.protos.fleet.broker_url import configure_client, parse_broker_url
from edgefleet.protos.fleet.topics import TopicKind, presence_topic, telemetry_topic
from edgefleet.protos.fleet.v1 import telemetry_pb2
from tests.integration.test_telemetry_mqtt import Agent, enroll, stored, wait_until
from tests.mqtt_tls import DeviceIdentity, issue_device

pytestmark = pytest.mark.integration


@pytest.fixture
def ca(tmp_path: Path) -> CertificateAuthority:
    return init_ca(tmp_path / "keys")


@pytest.fixture
def broker(ca: CertificateAuthority) -> Iterator[EmbeddedBroker]:
    key_pem, cert_pem = ca.issue_server(["127.0.0.1", "localhost"])
    embedded = EmbeddedBroker(
        device_tls=DeviceTls(ca_pem=ca.certificate_pem, cert_pem=cert_pem, key_pem=key_pem)
    )
    embedded.start()
    yield embedded
    embedded.stop()


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[Engine]:
    eng = make_engine(f"sqlite:///{tmp_path / 'cp.sqlite3'}")
    yield eng
    eng.dispose()


@pytest.fixture
def ingestor(broker: EmbeddedBroker, engine: Engine) -> Iterator[TelemetryIngestor]:
    running = TelemetryIngestor(engine=engine, broker_url=broker.url, client_id="edgefleet-controlplane-a")
    running.start()
    assert running.wait_subscribed(30)
    yield running
    running.stop()


def device(ca: CertificateAuthority, tmp_path: Path, device_id: str) -> DeviceIdentity:
    ca_path = tmp_path / "ca.pem"
    ca_path.write_bytes(ca.certificate_pem)
    return issue_device(ca, ca_path, tmp_path / "devices", device_id)


class Client:
    """A raw MQTT 3.1.1 client; ``refused`` holds the CONNACK code when the broker said no."""

    def __init__(
        self, url: str, client_id: str, *, tls: DeviceIdentity | None = None, user: str = ""
    ) -> None:
        address = parse_broker_url(url)
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=MQTTProtocolVersion.MQTTv311,
            clean_session=True,
            reconnect_on_failure=False,
        )
        configure_client(self.client, address, tls.ssl_context() if tls else None)
        if user:
            self.client.username_pw_set(user, "not the password")
        self.connack: queue.Queue[int] = queue.Queue()
        self.messages: queue.Queue[mqtt.MQTTMessage] = queue.Queue()
        self.gone = threading.Event()
        self.client.on_connect = lambda _c, _u, _f, rc, _p: self.connack.put(rc.value)
        self.client.on_disconnect = lambda *_: self.gone.set()
        self.client.on_message = lambda _c, _u, message: self.messages.put(message)
        self.client.connect(address.host, address.port)
        self.client.loop_start()
        self.code = self.connack.get(timeout=15)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def test_anonymous_and_wrong_password_clients_are_refused(broker: EmbeddedBroker) -> None:
    control = parse_broker_url(broker.url)
    plain = f"mqtt://{control.host}:{control.port}?protocol=3.1.1"
    anonymous = Client(plain, "nobody")
    guesser = Client(plain, "guesser", user=CONTROL_USER)
    try:
        # paho reports 3.1.1's CONNACK 4 as v5's "bad user name or password" (134)
        assert anonymous.code == 134 and guesser.code == 134
    finally:
        anonymous.close()
        guesser.close()


def test_a_refused_client_with_the_ingestors_client_id_does_not_disturb_it(
    broker: EmbeddedBroker,
    ingestor: TelemetryIngestor,
    engine: Engine,
    ca: CertificateAuthority,
    tmp_path: Path,
) -> None:
    control = parse_broker_url(broker.url)
    intruder = Client(f"mqtt://{control.host}:{control.port}?protocol=3.1.1", "edgefleet-controlplane-a")
    intruder.close()
    assert intruder.code == 134
    enroll(engine, "dev-a")
    agent = publisher_for(broker, device(ca, tmp_path, "dev-a"), tmp_path)
    try:
        send_heartbeat(agent)
        assert wait_until(lambda: len(stored(engine, "dev-a")) == 1)
        assert ingestor.stats().disconnects == 0
    finally:
        agent.close()


def publisher_for(broker: EmbeddedBroker, identity: DeviceIdentity, tmp_path: Path) -> Agent:
    """The agent's own publisher, given what enrollment gives it: the device URL and its
    certificate."""
    assert broker.device_url is not None
    outbox = Outbox(tmp_path / f"{identity.device_id}-{uuid.uuid4().hex[:6]}.sqlite3")
    publisher = TelemetryPublisher(
        device_id=identity.device_id,
        broker_url=broker.device_url,
        outbox=outbox,
        tls_context=identity.ssl_context(),
    )
    publisher.start()
    assert publisher.wait_connected(30)
    return Agent(identity.device_id, outbox, publisher)


def send_heartbeat(agent: Agent) -> None:
    agent.put(TopicKind.HEARTBEAT, telemetry_pb2.Heartbeat(requests_total=7))


def test_a_device_is_confined_to_its_own_topics(
    broker: EmbeddedBroker,
    ingestor: TelemetryIngestor,
    engine: Engine,
    ca: CertificateAuthority,
    tmp_path: Path,
) -> None:
    enroll(engine, "dev-a")
    enroll(engine, "dev-b")
    victim = publisher_for(broker, device(ca, tmp_path, "dev-b"), tmp_path)
    attacker_id = device(ca, tmp_path, "dev-a")
    attacker = Client(broker.device_url or "", "dev-a", tls=attacker_id)
    try:
        assert attacker.code == 0
        attacker.client.subscribe("#", qos=1)
        # forged: the victim's next sequence numbers and its presence
        forged = b'[{"schemaVersion": 1, "deviceId": "dev-b", "seq": "1"}]'
        attacker.client.publish(
            telemetry_topic("dev-b", TopicKind.HEARTBEAT), forged, qos=1
        ).wait_for_publish(10)
        attacker.client.publish(presence_topic("dev-b"), b'{"deviceId": "dev-b", "online": false}', qos=1)
        own = b'[{"schemaVersion": 1, "deviceId": "dev-a", "seq": "1"}]'
        attacker.client.publish(telemetry_topic("dev-a", TopicKind.HEARTBEAT), own, qos=1).wait_for_publish(
            10
        )
        assert wait_until(lambda: len(stored(engine, "dev-a")) == 1)
        assert stored(engine, "dev-b") == []
        send_heartbeat(victim)
        assert wait_until(lambda: len(stored(engine, "dev-b")) == 1)
        assert stored(engine, "dev-b")[0][2].get("requestsTotal") == "7", (
            "the victim's own record, not the forged one"
        )
        seen = []
        while not attacker.messages.empty():
            seen.append(attacker.messages.get().topic)
        assert all(topic.startswith("fleet/v1/devices/dev-a/") for topic in seen), seen
    finally:
        attacker.close()
        victim.close()


def test_a_device_may_not_use_another_client_id(
    broker: EmbeddedBroker, ingestor: TelemetryIngestor, ca: CertificateAuthority, tmp_path: Path
) -> None:
    identity = device(ca, tmp_path, "dev-a")
    for client_id in ("edgefleet-controlplane-a", "dev-b"):
        taker = Client(broker.device_url or "", client_id, tls=identity)
        taker.close()
        assert taker.code == 133  # 3.1.1's CONNACK 2, identifier rejected
    assert ingestor.stats().disconnects == 0


def test_a_device_without_a_fleet_certificate_cannot_connect(broker: EmbeddedBroker, tmp_path: Path) -> None:
    stranger = device(init_ca(tmp_path / "other"), tmp_path / "other", "dev-a")
    with pytest.raises((OSError, mqtt.WebsocketConnectionError)):
        Client(broker.device_url or "", "dev-a", tls=stranger)


def test_a_packet_beyond_the_limit_ends_its_connection_only(
    broker: EmbeddedBroker,
    ingestor: TelemetryIngestor,
    engine: Engine,
    ca: CertificateAuthority,
    tmp_path: Path,
) -> None:
    enroll(engine, "dev-a")
    flooder = Client(broker.device_url or "", "dev-a", tls=device(ca, tmp_path, "dev-a"))
    try:
        assert flooder.code == 0
        flooder.client.publish(
            telemetry_topic("dev-a", TopicKind.HEARTBEAT), b"[" + b" " * 300_000 + b"]", qos=1
        )
        assert flooder.gone.wait(15)
    finally:
        flooder.close()
    agent = publisher_for(broker, device(ca, tmp_path, "dev-a"), tmp_path)
    try:
        send_heartbeat(agent)
        assert wait_until(lambda: len(stored(engine, "dev-a")) == 1)
    finally:
        agent.close()


def test_the_ingestor_recovers_from_a_client_id_takeover(
    broker: EmbeddedBroker,
    ingestor: TelemetryIngestor,
    engine: Engine,
    ca: CertificateAuthority,
    tmp_path: Path,
) -> None:
    """Even a trusted client (the control plane's password) taking the ingestor's client id only
    interrupts it: it notices, counts, reconnects and subscribes again."""
    taker = Client(broker.url, "edgefleet-controlplane-a")
    assert taker.code == 0
    assert wait_until(lambda: ingestor.stats().disconnects >= 1)
    taker.close()
    assert wait_until(lambda: ingestor.wait_subscribed(0))
    enroll(engine, "dev-a")
    agent = publisher_for(broker, device(ca, tmp_path, "dev-a"), tmp_path)
    try:
        send_heartbeat(agent)
        assert wait_until(lambda: len(stored(engine, "dev-a")) == 1)
    finally:
        agent.close()


def test_nothing_listens_beyond_loopback(broker: EmbeddedBroker) -> None:
    for url in (broker.url, broker.device_url or ""):
        port = parse_broker_url(url).port
        with socket.socket() as probe:
            probe.settimeout(0.5)
            assert probe.connect_ex((socket.gethostbyname(socket.gethostname()), port)) != 0 or (
                socket.gethostbyname(socket.gethostname()).startswith("127.")
            )
