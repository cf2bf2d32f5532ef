"""The production files in deploy/ work as written: Mosquitto starts from our config, the ACL
confines each device to its own topics, and the systemd units pass systemd's own checks.

The broker runs from a copy of deploy/mosquitto/mosquitto.conf in which only paths, ports and
the run-as user change, next to the real ACL file and throwaway certificates.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import pwd
import queue
import re
import shutil
import socket
import ssl
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from protos.fleet.topics import TopicKind, device_prefix, telemetry_subscription, telemetry_topic

pytestmark = pytest.mark.integration

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
_SBIN_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/local/sbin", "/usr/sbin", "/sbin"])
MOSQUITTO = shutil.which("mosquitto", path=_SBIN_PATH)
MOSQUITTO_PASSWD = shutil.which("mosquitto_passwd", path=_SBIN_PATH)
SYSTEMD_ANALYZE = shutil.which("systemd-analyze")

CONTROLPLANE_USER = "edgefleet-controlplane"  # the user the ACL file grants telemetry reads
PASSWORD = "test-password"
SILENCE_S = 1.5  # how long "receives nothing" is watched for
WAIT_S = 10.0

needs_mosquitto = pytest.mark.skipif(MOSQUITTO is None, reason="no mosquitto binary")


# --- throwaway PKI ---


@dataclass(frozen=True)
class Pki:
    ca: Path
    broker_cert: Path
    broker_key: Path
    device_cert: Path
    device_key: Path
    device_id: str


def _write_key(path: Path) -> ec.EllipticCurvePrivateKey:
    key = ec.generate_private_key(ec.SECP256R1())
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return key


def _issue(
    path: Path,
    key: ec.EllipticCurvePrivateKey,
    common_name: str,
    issuer: tuple[x509.Name, ec.EllipticCurvePrivateKey] | None,
    extensions: list[x509.ExtensionType],
    *,
    ca: bool = False,
) -> x509.Name:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    issuer_name, issuer_key = issuer or (name, key)
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if ca:
        builder = builder.add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
        )
    for extension in extensions:
        builder = builder.add_extension(extension, critical=False)
    path.write_bytes(builder.sign(issuer_key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM))
    return name


def _make_pki(directory: Path) -> Pki:
    ca_key = _write_key(directory / "ca.key")
    ca_name = _issue(directory / "ca.crt", ca_key, "edgefleet test device CA", None, [], ca=True)
    broker_key = _write_key(directory / "broker.key")
    _issue(
        directory / "broker.crt",
        broker_key,
        "localhost",
        (ca_name, ca_key),
        [
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
        ],
    )
    device_id = "device-c"
    device_key = _write_key(directory / "device.key")
    _issue(
        directory / "device.crt",
        device_key,
        device_id,
        (ca_name, ca_key),
        [x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH])],
    )
    return Pki(
        ca=directory / "ca.crt",
        broker_cert=directory / "broker.crt",
        broker_key=directory / "broker.key",
        device_cert=directory / "device.crt",
        device_key=directory / "device.key",
        device_id=device_id,
    )


# --- the broker, from a copy of the production config ---


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _test_config(source: str, paths: Mapping[str, str]) -> tuple[str, dict[str, int]]:
    """The production config with ``paths`` substituted and every listener moved to a free
    loopback port; returns it with a map of production port -> test port."""
    ports: dict[str, int] = {}
    seen: set[str] = set()
    lines = []
    for line in source.splitlines():
        words = line.split()
        if not words or words[0].startswith("#"):
            lines.append(line)
            continue
        seen.add(words[0])
        if words[0] == "listener":
            ports[words[1]] = _free_port()
            lines.append(f"listener {ports[words[1]]} 127.0.0.1")
        elif words[0] in paths:
            lines.append(f"{words[0]} {paths[words[0]]}")
        else:
            lines.append(line)
    missing = set(paths) - seen
    assert not missing, f"deploy/mosquitto/mosquitto.conf no longer sets {sorted(missing)}"
    return "\n".join(lines) + "\n", ports


@dataclass
class Broker:
    process: subprocess.Popen[bytes]
    plain_port: int
    tls_port: int
    pki: Pki
    log: Path
    data: Path

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


def _port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


@contextmanager
def _run_broker(directory: Path) -> Iterator[Broker]:
    assert MOSQUITTO is not None
    if MOSQUITTO_PASSWD is None:
        pytest.skip("mosquitto is installed without mosquitto_passwd")
    directory.mkdir(parents=True, exist_ok=True)
    pki = _make_pki(directory)
    passwd = directory / "passwd"
    for i, user in enumerate((CONTROLPLANE_USER, "device-a", "device-b")):
        create = ["-c"] if i == 0 else []
        subprocess.run([MOSQUITTO_PASSWD, "-b", *create, str(passwd), user, PASSWORD], check=True)
    passwd.chmod(0o600)
    acl = directory / "acl"
    shutil.copyfile(DEPLOY / "mosquitto" / "acl", acl)
    data = directory / "data"
    data.mkdir()
    config, ports = _test_config(
        (DEPLOY / "mosquitto" / "mosquitto.conf").read_text(),
        {
            "password_file": str(passwd),
            "acl_file": str(acl),
            "persistence_location": f"{data}/",
            "cafile": str(pki.ca),
            "certfile": str(pki.broker_cert),
            "keyfile": str(pki.broker_key),
            # Stay the user who owns these files instead of dropping to "mosquitto".
            "user": pwd.getpwuid(os.geteuid()).pw_name,
        },
    )
    assert set(ports) == {"1883", "8883"}, f"unexpected listeners {sorted(ports)}"
    conf = directory / "mosquitto.conf"
    conf.write_text(config)
    log = directory / "mosquitto.log"
    with log.open("wb") as log_file:
        process = subprocess.Popen(
            [MOSQUITTO, "-c", str(conf)], stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )
    broker = Broker(process, ports["1883"], ports["8883"], pki, log, data)
    try:
        deadline = time.monotonic() + WAIT_S
        while not (_port_open(broker.plain_port) and _port_open(broker.tls_port)):
            if process.poll() is not None:
                pytest.fail(f"mosquitto exited with {process.returncode}:\n{broker.log_text()}")
            if time.monotonic() > deadline:
                pytest.fail(f"mosquitto did not open its listeners:\n{broker.log_text()}")
            time.sleep(0.05)
        yield broker
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=WAIT_S)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    if MOSQUITTO is None:
        pytest.skip("no mosquitto binary")
    with _run_broker(tmp_path_factory.mktemp("mosquitto")) as running:
        yield running


# --- a small synchronous MQTT client over paho's VERSION2 callbacks ---


class Client:
    def __init__(self, label: str) -> None:
        self.messages: queue.Queue[tuple[str, bytes]] = queue.Queue()
        self._connected = threading.Event()
        self._connack: ReasonCode | None = None
        self._subacks: dict[int, list[ReasonCode]] = {}
        self._subscribed = threading.Condition()
        self.mqtt = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=f"test-{label}-{uuid.uuid4().hex[:8]}",
            protocol=MQTTProtocolVersion.MQTTv311,
        )
        self.mqtt.on_connect = self._on_connect
        self.mqtt.on_subscribe = self._on_subscribe
        self.mqtt.on_message = self._on_message

    def _on_connect(
        self,
        client: mqtt.Client,
        userdata: object,
        flags: mqtt.ConnectFlags,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        self._connack = reason_code
        self._connected.set()

    def _on_subscribe(
        self,
        client: mqtt.Client,
        userdata: object,
        mid: int,
        reason_codes: list[ReasonCode],
        properties: Properties | None,
    ) -> None:
        with self._subscribed:
            self._subacks[mid] = reason_codes
            self._subscribed.notify_all()

    def _on_message(self, client: mqtt.Client, userdata: object, message: mqtt.MQTTMessage) -> None:
        self.messages.put((message.topic, bytes(message.payload)))

    def connect(self, port: int) -> bool:
        """True once the broker accepted the connection, False if it refused or hung up."""
        try:
            self.mqtt.connect("127.0.0.1", port, keepalive=30)
        except (OSError, ssl.SSLError):
            return False
        self.mqtt.loop_start()
        return self._connected.wait(5.0) and self._connack is not None and not self._connack.is_failure

    def subscribe(self, topic: str) -> bool:
        """True if the broker granted the subscription."""
        _, mid = self.mqtt.subscribe(topic, qos=1)
        assert mid is not None
        with self._subscribed:
            assert self._subscribed.wait_for(lambda: mid in self._subacks, timeout=5.0)
            return not any(code.is_failure for code in self._subacks[mid])

    def publish(self, topic: str, payload: bytes) -> None:
        info = self.mqtt.publish(topic, payload, qos=1)
        info.wait_for_publish(timeout=5.0)
        assert info.is_published()

    def receive_until(self, payload: bytes) -> list[tuple[str, bytes]]:
        """Everything received up to and including ``payload``, then for SILENCE_S more."""
        received: list[tuple[str, bytes]] = []
        deadline = time.monotonic() + WAIT_S
        while payload not in (p for _, p in received):
            try:
                received.append(self.messages.get(timeout=max(0.0, deadline - time.monotonic())))
            except queue.Empty:
                pytest.fail(f"never received {payload!r}; got {received}")
        time.sleep(SILENCE_S)
        while not self.messages.empty():
            received.append(self.messages.get_nowait())
        return received

    def close(self) -> None:
        self.mqtt.disconnect()
        self.mqtt.loop_stop()


@contextmanager
def _connected(
    broker: Broker, label: str, *, username: str | None = None, tls_identity: bool = False
) -> Iterator[Client]:
    client = Client(label)
    if username is not None:
        client.mqtt.username_pw_set(username, PASSWORD)
    port = broker.plain_port
    if tls_identity:
        context = ssl.create_default_context(cafile=str(broker.pki.ca))
        context.load_cert_chain(broker.pki.device_cert, broker.pki.device_key)
        client.mqtt.tls_set_context(context)
        port = broker.tls_port
    try:
        assert client.connect(port), f"{label} could not connect:\n{broker.log_text()}"
        yield client
    finally:
        client.close()


# --- Mosquitto ---


@needs_mosquitto
def test_mosquitto_conf_runs_and_persists(tmp_path: Path) -> None:
    with _run_broker(tmp_path) as running:
        time.sleep(2.0)
        assert running.process.poll() is None, running.log_text()
        running.process.terminate()
        assert running.process.wait(timeout=WAIT_S) == 0, running.log_text()

    assert "Error" not in running.log_text()
    assert (running.data / "mosquitto.db").exists(), "persistence is off or writes elsewhere"


def test_anonymous_client_is_refused(broker: Broker) -> None:
    client = Client("anonymous")
    try:
        assert not client.connect(broker.plain_port)
    finally:
        client.close()


def test_device_cannot_publish_as_another_device(broker: Broker) -> None:
    kind = TopicKind.HEARTBEAT
    with (
        _connected(broker, "controlplane", username=CONTROLPLANE_USER) as controlplane,
        _connected(broker, "device-b", username="device-b") as device_b,
    ):
        assert controlplane.subscribe(telemetry_subscription())
        device_b.publish(telemetry_topic("device-a", kind), b"forged by b")
        device_b.publish(telemetry_topic("device-b", kind), b"from b")

        received = controlplane.receive_until(b"from b")

    assert received == [(telemetry_topic("device-b", kind), b"from b")]


def test_device_reads_only_its_own_topics(broker: Broker) -> None:
    with (
        _connected(broker, "device-a", username="device-a") as device_a,
        _connected(broker, "device-b", username="device-b") as device_b,
    ):
        assert device_a.subscribe(f"{device_prefix('device-a')}/#")
        device_a.subscribe(f"{device_prefix('device-b')}/#")  # granted or not, nothing may arrive
        device_a.subscribe("fleet/v1/devices/+/telemetry/+")
        device_b.publish(telemetry_topic("device-b", TopicKind.INFERENCE), b"b's secret")
        device_a.publish(telemetry_topic("device-a", TopicKind.INFERENCE), b"a's own")

        received = device_a.receive_until(b"a's own")

    assert b"b's secret" not in [payload for _, payload in received]


def test_control_plane_cannot_publish(broker: Broker) -> None:
    with (
        _connected(broker, "controlplane", username=CONTROLPLANE_USER) as controlplane,
        _connected(broker, "device-a", username="device-a") as device_a,
    ):
        assert device_a.subscribe(f"{device_prefix('device-a')}/#")
        controlplane.publish(telemetry_topic("device-a", TopicKind.DEPLOYMENT), b"from the control plane")
        time.sleep(0.2)  # different connections: give the forged message its head start
        device_a.publish(telemetry_topic("device-a", TopicKind.DEPLOYMENT), b"a's own")

        received = device_a.receive_until(b"a's own")

    assert [payload for _, payload in received] == [b"a's own"]


def test_device_certificate_is_its_identity(broker: Broker) -> None:
    device_id = broker.pki.device_id
    with (
        _connected(broker, "controlplane", username=CONTROLPLANE_USER) as controlplane,
        _connected(broker, device_id, tls_identity=True) as device,
    ):
        assert controlplane.subscribe(telemetry_subscription())
        device.publish(telemetry_topic("device-a", TopicKind.HEARTBEAT), b"forged over tls")
        device.publish(telemetry_topic(device_id, TopicKind.HEARTBEAT), b"over tls")

        received = controlplane.receive_until(b"over tls")

    assert received == [(telemetry_topic(device_id, TopicKind.HEARTBEAT), b"over tls")]


def test_tls_listener_requires_a_client_certificate(broker: Broker) -> None:
    client = Client("no-certificate")
    client.mqtt.username_pw_set("device-a", PASSWORD)
    client.mqtt.tls_set_context(ssl.create_default_context(cafile=str(broker.pki.ca)))
    try:
        assert not client.connect(broker.tls_port)
    finally:
        client.close()


# --- systemd units ---

UNITS = ("edgefleet-agent.service", "edgefleet-controlplane.service")
INSTALL_PREFIX = "/opt/edgefleet/venv/bin/"


def _directives(unit: Path) -> dict[str, list[str]]:
    values: dict[str, list[str]] = {}
    for line in unit.read_text().splitlines():
        key, sep, value = line.partition("=")
        if sep and not line.startswith(("#", ";", "[")):
            values.setdefault(key.strip(), []).append(value.strip())
    return values


@pytest.mark.parametrize("unit", UNITS)
def test_systemd_unit_is_hardened(unit: str) -> None:
    directives = _directives(DEPLOY / "systemd" / unit)

    for key, value in {
        "DynamicUser": "yes",
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "Restart": "on-failure",
        "CapabilityBoundingSet": "",
    }.items():
        assert directives.get(key) == [value], f"{unit}: {key}"
    assert directives["RestartSec"]
    assert directives["StateDirectory"]
    name = unit.removeprefix("edgefleet-").removesuffix(".service")
    assert directives["EnvironmentFile"] == [f"-/etc/edgefleet/{name}.env"]
    assert directives["ExecStart"][0].startswith(INSTALL_PREFIX)


def test_systemd_commands() -> None:
    agent = _directives(DEPLOY / "systemd" / "edgefleet-agent.service")
    controlplane = _directives(DEPLOY / "systemd" / "edgefleet-controlplane.service")

    assert agent["ExecStart"] == [
        # The token and broker URL come from EDGEFLEET_TOKEN / EDGEFLEET_MQTT in the
        # environment file: a token on the command line would be visible in `ps`.
        f"{INSTALL_PREFIX}fleet-agent run --controlplane ${{EDGEFLEET_CONTROLPLANE}} "
        "--trust /etc/edgefleet/trust.json --state-dir /var/lib/edgefleet-agent"
    ]
    assert agent["StateDirectory"] == ["edgefleet-agent"]
    assert controlplane["ExecStart"] == [
        f"{INSTALL_PREFIX}fleetctl serve --listen 0.0.0.0:7443 --data-dir /var/lib/edgefleet "
        "--keys-dir /var/lib/edgefleet/keys --mqtt ${EDGEFLEET_MQTT}"
    ]
    assert controlplane["StateDirectory"] == ["edgefleet"]


def _verify(units: list[Path]) -> subprocess.CompletedProcess[str]:
    assert SYSTEMD_ANALYZE is not None
    return subprocess.run(
        [SYSTEMD_ANALYZE, "verify", "--man=no", *map(str, units)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.skipif(SYSTEMD_ANALYZE is None, reason="no systemd-analyze")
def test_systemd_units_verify(tmp_path: Path) -> None:
    # systemd checks that ExecStart exists: point it at stand-ins for the installed commands.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for command in ("fleet-agent", "fleetctl"):
        (bin_dir / command).write_text("#!/bin/sh\n")
        (bin_dir / command).chmod(0o755)
    known_good = tmp_path / "edgefleet-known-good.service"
    known_good.write_text(f"[Service]\nExecStart={bin_dir}/fleetctl\n")
    if _verify([known_good]).returncode != 0:
        pytest.skip("systemd-analyze verify does not work on this host")
    copies = []
    for unit in UNITS:
        copy = tmp_path / unit
        copy.write_text((DEPLOY / "systemd" / unit).read_text().replace(INSTALL_PREFIX, f"{bin_dir}/"))
        copies.append(copy)

    result = _verify(copies)

    complaints = [line for line in result.stderr.splitlines() if any(unit in line for unit in UNITS)]
    assert result.returncode == 0, result.stderr
    assert complaints == []

    for copy in copies:
        security = subprocess.run(
            [str(SYSTEMD_ANALYZE), "security", "--offline=true", "--no-pager", str(copy)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        score = re.search(r"Overall exposure level for \S+: ([0-9.]+)", security.stdout)
        if security.returncode == 0 and score:  # --offline needs systemd >= 250
            assert float(score.group(1)) <= 3.0, security.stdout
