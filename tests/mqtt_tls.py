"""A real Mosquitto with the production device-access setup, and clients to probe it.

The access rules that keep devices apart live in Mosquitto's config, not in our code, so the
only meaningful test is against a real broker running that config. ``start_tls_broker`` runs
deploy/mosquitto/mosquitto.conf itself, with only paths, ports and the run-as user changed,
next to a copy of deploy/mosquitto/acl: a change to either file is tested as written. This is
the one way tests run the production config. Certificates come from the fleet CA
(``edgefleet.controlplane.trust.ca``) and the CRL from ``edgefleet.controlplane.trust.crl``, as in production.

Everything waits on events or log lines with deadlines; nothing sleeps for a fixed time.
"""

from __future__ import annotations

import getpass
import os
import queue
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import paho.mqtt.client as mqtt
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import NameOID
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions

from edgefleet.controlplane.telemetry.ingest import SESSION_EXPIRY_S
from edgefleet.controlplane.trust.ca import CertificateAuthority, init_ca, new_private_key, private_key_pem
from edgefleet.controlplane.trust.crl import RevokedCertificate, write_crl
from edgefleet.controlplane.trust.revocation import end_broker_session
from tests.conftest import port_open

DEPLOY_MOSQUITTO = Path(__file__).resolve().parents[1] / "deploy" / "mosquitto"
CONTROLPLANE_USER = "edgefleet-controlplane"  # the password user deploy/mosquitto/acl grants reads
WAIT_S = 10.0
NOT_AUTHORIZED = 0x87  # the MQTT v5 reason code of a CONNACK or PUBACK refused by auth or ACL
NO_MATCHING_SUBSCRIBERS = 0x10  # a v5 PUBACK's "accepted, but nobody subscribes to it"
_SBIN_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/local/sbin", "/usr/sbin", "/sbin"])
# Mosquitto logs this (log_type information) at the start of a SIGHUP reload. Its main loop is
# single-threaded and reloads before it serves another packet, so a connection made after
# the line appears is handled with the reloaded config.
RELOAD_LINE = "Reloading config."


def mosquitto_programs() -> tuple[str, str] | None:
    """(mosquitto, mosquitto_passwd), or None when either is missing (tests then skip)."""
    broker = shutil.which("mosquitto", path=_SBIN_PATH)
    passwd = shutil.which("mosquitto_passwd", path=_SBIN_PATH)
    return (broker, passwd) if broker and passwd else None


# --- device identities from the fleet CA ---


@dataclass(frozen=True)
class DeviceIdentity:
    """A device's key and certificate on disk, as the agent holds them after enrollment."""

    device_id: str
    serial: int
    key_path: Path
    cert_path: Path
    ca_path: Path

    def ssl_context(self) -> ssl.SSLContext:
        """A client context for paho: trusts the fleet CA, presents this device's certificate."""
        context = ssl.create_default_context(cafile=str(self.ca_path))
        context.load_cert_chain(self.cert_path, self.key_path)
        return context


def issue_device(ca: CertificateAuthority, ca_path: Path, directory: Path, device_id: str) -> DeviceIdentity:
    """Enrolls ``device_id`` the way an agent does: a P-256 key made locally, a CSR signed by it,
    and the certificate the CA issues for that CSR (files in ``directory``)."""
    key = new_private_key()
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, device_id)]))
        .sign(key, hashes.SHA256())
    )
    issued = ca.sign_device_csr(csr.public_bytes(serialization.Encoding.PEM), device_id=device_id)
    directory.mkdir(parents=True, exist_ok=True)
    stem = f"{device_id}-{issued.serial:x}"
    key_path, cert_path = directory / f"{stem}.key", directory / f"{stem}.crt"
    key_path.write_bytes(private_key_pem(key))
    key_path.chmod(0o600)
    cert_path.write_bytes(issued.certificate_pem)
    return DeviceIdentity(device_id, issued.serial, key_path, cert_path, ca_path)


def trust_only_context(ca_path: Path) -> ssl.SSLContext:
    """A client context that verifies the broker but presents no certificate of its own."""
    return ssl.create_default_context(cafile=str(ca_path))


# --- the broker ---


def production_config(source: str, *, paths: Mapping[str, str], ports: Mapping[str, int]) -> str:
    """deploy/mosquitto/mosquitto.conf with every active setting named in ``paths`` given that
    value and each production listener port moved to ``ports[port]`` on loopback. Fails if the
    production file stops setting one of ``paths`` or opening one of ``ports``, grows a listener
    this helper does not know, or names a file outside ``paths`` (the host's own /etc would be
    read): the test config cannot silently drift from production."""
    seen: set[str] = set()
    listeners: set[str] = set()
    lines = []
    for line in source.splitlines():
        words = line.split()
        if not words or words[0].startswith("#"):
            lines.append(line)
            continue
        key = words[0]
        seen.add(key)
        if key == "listener":
            if words[1] not in ports:
                raise AssertionError(f"deploy/mosquitto/mosquitto.conf has an unknown listener: {line}")
            listeners.add(words[1])
            lines.append(f"listener {ports[words[1]]} 127.0.0.1")
        elif key in paths:
            lines.append(f"{key} {paths[key]}")
        elif any(word.startswith("/") for word in words[1:]):
            raise AssertionError(f"deploy/mosquitto/mosquitto.conf reads a path tests do not replace: {line}")
        else:
            lines.append(line)
    missing = sorted(set(paths) - seen) + [f"listener {port}" for port in sorted(set(ports) - listeners)]
    if missing:
        raise AssertionError(f"deploy/mosquitto/mosquitto.conf no longer sets {missing}")
    return "\n".join(lines) + "\n"


@dataclass
class TlsBroker:
    """A running Mosquitto with the production config: a loopback password listener
    (``plain_port``) and the mutual-TLS device listener (``tls_port``)."""

    work: Path
    ca: CertificateAuthority
    ca_path: Path
    plain_port: int
    tls_port: int
    controlplane_password: str
    crl_path: Path
    conf_path: Path
    log_path: Path
    revoked: list[RevokedCertificate] = field(default_factory=list)
    process: subprocess.Popen[bytes] = field(init=False)

    def start(self) -> None:
        """Starts Mosquitto from ``conf_path`` (again, after ``stop``: same ports, files and
        persistence database, log appended); returns once both listeners accept connections."""
        programs = mosquitto_programs()
        if programs is None:
            raise RuntimeError("mosquitto and mosquitto_passwd are needed: run dev/setup")
        with self.log_path.open("ab") as log_file:
            self.process = subprocess.Popen(
                [programs[0], "-c", str(self.conf_path)],
                stdout=log_file,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        try:
            wait_for(self._listening, "mosquitto to open both listeners")
        except BaseException:
            self.stop()
            raise

    def _listening(self) -> bool:
        if self.process.poll() is not None:
            raise RuntimeError(f"mosquitto exited with {self.process.returncode}:\n{self.log_text()}")
        return port_open("127.0.0.1", self.plain_port) and port_open("127.0.0.1", self.tls_port)

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    @property
    def controlplane_url(self) -> str:
        """The loopback listener as the control plane's password user (token_urlsafe: no escaping)."""
        return f"mqtt://{CONTROLPLANE_USER}:{self.controlplane_password}@127.0.0.1:{self.plain_port}"

    @property
    def device_url(self) -> str:
        return f"mqtts://127.0.0.1:{self.tls_port}"

    def issue_device(self, device_id: str) -> DeviceIdentity:
        return issue_device(self.ca, self.ca_path, self.work / "devices", device_id)

    def reload(self) -> None:
        """SIGHUP, as ``systemctl reload mosquitto`` does; returns once Mosquitto has begun the
        reload, after which every new connection sees the reloaded files (see RELOAD_LINE)."""
        before = self.log_text().count(RELOAD_LINE)
        self.process.send_signal(signal.SIGHUP)
        wait_for(lambda: self.log_text().count(RELOAD_LINE) > before, f"mosquitto to log {RELOAD_LINE!r}")

    def revoke(self, *serials: int) -> None:
        """Adds ``serials`` to the CRL, rewrites it and makes the broker re-read it."""
        now = datetime.now(UTC)
        self.revoked.extend(RevokedCertificate(serial, now) for serial in serials)
        write_crl(self.crl_path, self.ca, self.revoked)
        self.reload()

    def stop(self) -> None:
        """SIGTERM, as ``systemctl stop`` sends (Mosquitto saves its database and exits 0); the
        exit status is left in ``process.returncode``."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=WAIT_S)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def start_tls_broker(work: Path, ca: CertificateAuthority | None = None) -> TlsBroker:
    """Starts Mosquitto from deploy/mosquitto/mosquitto.conf under ``work`` on free ports.

    ``ca`` (default: a fresh fleet CA) issues the broker's certificate (for 127.0.0.1 and
    localhost) and signs an empty CRL, written before the start because Mosquitto refuses to
    start without its ``crlfile``. The control plane's password is random; see
    ``controlplane_password``.
    """
    programs = mosquitto_programs()
    if programs is None:
        raise RuntimeError("mosquitto and mosquitto_passwd are needed: run dev/setup")
    mosquitto_passwd = programs[1]
    work.mkdir(parents=True, exist_ok=True)
    ca = ca or init_ca(work / "keys")
    ca_path = work / "ca.pem"
    ca_path.write_bytes(ca.certificate_pem)
    broker_key, broker_cert = ca.issue_server(["127.0.0.1", "localhost"])
    (work / "broker.key").write_bytes(broker_key)
    (work / "broker.key").chmod(0o600)
    (work / "broker.crt").write_bytes(broker_cert)
    crl_path = work / "devices.crl"
    write_crl(crl_path, ca, [])
    password = secrets.token_urlsafe(16)
    passwd = work / "passwd"
    subprocess.run(
        [mosquitto_passwd, "-b", "-c", str(passwd), CONTROLPLANE_USER, password],
        check=True,
        capture_output=True,
    )
    passwd.chmod(0o600)
    acl = work / "acl"
    shutil.copyfile(DEPLOY_MOSQUITTO / "acl", acl)
    data = work / "data"
    data.mkdir(exist_ok=True)
    plain_port, tls_port = _two_free_ports()
    config = production_config(
        (DEPLOY_MOSQUITTO / "mosquitto.conf").read_text(),
        paths={
            "password_file": str(passwd),
            "acl_file": str(acl),
            "persistence_location": f"{data}/",
            "cafile": str(ca_path),
            "certfile": str(work / "broker.crt"),
            "keyfile": str(work / "broker.key"),
            "crlfile": str(crl_path),
            # Stay the user who owns these files instead of dropping to "mosquitto".
            "user": getpass.getuser(),
        },
        ports={"1883": plain_port, "8883": tls_port},
    )
    conf = work / "mosquitto.conf"
    conf.write_text(config)
    log_path = work / "mosquitto.log"
    log_path.write_bytes(b"")
    broker = TlsBroker(work, ca, ca_path, plain_port, tls_port, password, crl_path, conf, log_path)
    broker.start()
    return broker


def _two_free_ports() -> tuple[int, int]:
    """Two distinct free loopback ports (two calls to free_port may return the same one)."""
    with socket.socket() as first, socket.socket() as second:
        first.bind(("127.0.0.1", 0))
        second.bind(("127.0.0.1", 0))
        return int(first.getsockname()[1]), int(second.getsockname()[1])


def wait_for(predicate: Callable[[], bool], what: str, timeout: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.02)


# --- a small synchronous MQTT client over paho's VERSION2 callbacks ---


class Probe:
    """One MQTT v5 connection whose CONNACK, SUBACK and PUBACK reason codes the test can read.

    ``persistent`` makes it the session ``edgefleet.controlplane.telemetry.ingest`` keeps: clean
    start off and a
    Session Expiry Interval, so the broker queues QoS 1 messages while it is away. ``will`` is a
    (topic, payload) Last Will, retained at QoS 1 as the agent registers its Presence.

    paho's automatic reconnect is never used: a refused or dropped connection stays down, so
    a test sees exactly what the broker did.
    """

    def __init__(
        self,
        label: str,
        *,
        client_id: str | None = None,
        persistent: bool = False,
        will: tuple[str, bytes] | None = None,
    ) -> None:
        self.client_id = client_id or f"{label}-{uuid.uuid4().hex[:8]}"
        self.messages: queue.Queue[tuple[str, bytes]] = queue.Queue()
        self.disconnected = threading.Event()
        self.disconnect_reason: ReasonCode | None = None
        self.connack: ReasonCode | None = None
        self.session_present = False
        self._answered = threading.Event()
        self._acks: dict[int, list[ReasonCode]] = {}
        self._acked = threading.Condition()
        self.persistent = persistent
        self.mqtt = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=self.client_id,
            protocol=MQTTProtocolVersion.MQTTv5,
            reconnect_on_failure=False,
        )
        if will is not None:
            self.mqtt.will_set(will[0], will[1], qos=1, retain=True)
        self.mqtt.on_connect = self._on_connect
        self.mqtt.on_disconnect = self._on_disconnect
        self.mqtt.on_subscribe = self._on_subscribe
        self.mqtt.on_publish = self._on_publish
        self.mqtt.on_message = self._on_message

    def _on_connect(
        self,
        client: mqtt.Client,
        userdata: object,
        flags: mqtt.ConnectFlags,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        self.connack = reason_code
        self.session_present = flags.session_present
        self._answered.set()

    def _on_disconnect(
        self,
        client: mqtt.Client,
        userdata: object,
        flags: mqtt.DisconnectFlags,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        self.disconnect_reason = reason_code
        self.disconnected.set()
        self._answered.set()

    def _ack(self, mid: int, codes: list[ReasonCode]) -> None:
        with self._acked:
            self._acks[mid] = codes
            self._acked.notify_all()

    def _on_subscribe(
        self,
        client: mqtt.Client,
        userdata: object,
        mid: int,
        reason_codes: list[ReasonCode],
        properties: Properties | None,
    ) -> None:
        self._ack(mid, reason_codes)

    def _on_publish(
        self,
        client: mqtt.Client,
        userdata: object,
        mid: int,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        self._ack(mid, [reason_code])

    def _on_message(self, client: mqtt.Client, userdata: object, message: mqtt.MQTTMessage) -> None:
        self.messages.put((message.topic, bytes(message.payload)))

    def connect(
        self,
        port: int,
        *,
        tls: ssl.SSLContext | None = None,
        username: str | None = None,
        password: str | None = None,
    ) -> bool:
        """True once the broker accepted the connection (CONNACK success); False when it refused
        it, in the TLS handshake or with a failed CONNACK, or hung up before answering."""
        if tls is not None:
            self.mqtt.tls_set_context(tls)
        if username is not None:
            self.mqtt.username_pw_set(username, password)
        session = None
        if self.persistent:
            session = Properties(PacketTypes.CONNECT)
            session.SessionExpiryInterval = SESSION_EXPIRY_S
        try:
            self.mqtt.connect(
                "127.0.0.1", port, keepalive=30, clean_start=not self.persistent, properties=session
            )
        except (OSError, ssl.SSLError):
            return False
        self.mqtt.loop_start()
        if not self._answered.wait(WAIT_S):
            raise TimeoutError(f"{self.client_id}: no CONNACK and no disconnect from the broker")
        return self.connack is not None and not self.connack.is_failure and not self.disconnected.is_set()

    def _wait_ack(self, mid: int | None, what: str) -> list[ReasonCode]:
        assert mid is not None
        with self._acked:
            if not self._acked.wait_for(lambda: mid in self._acks, timeout=WAIT_S):
                raise TimeoutError(f"{self.client_id}: no {what} for message {mid}")
            return self._acks.pop(mid)

    def subscribe(self, topic: str, *, retained: bool = True) -> ReasonCode:
        """The SUBACK's reason code for ``topic`` (QoS 1): granted QoS or a failure code.
        ``retained=False`` asks the broker not to send the retained messages it holds."""
        handling = (
            SubscribeOptions.RETAIN_SEND_ON_SUBSCRIBE if retained else SubscribeOptions.RETAIN_DO_NOT_SEND
        )
        result, mid = self.mqtt.subscribe(topic, options=SubscribeOptions(qos=1, retainHandling=handling))
        assert result == MQTTErrorCode.MQTT_ERR_SUCCESS, result
        [code] = self._wait_ack(mid, "SUBACK")
        return code

    def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> ReasonCode:
        """Publishes at QoS 1 and returns the PUBACK's reason code."""
        info = self.mqtt.publish(topic, payload, qos=1, retain=retain)
        [code] = self._wait_ack(info.mid, "PUBACK")
        return code

    def receive_until(self, payload: bytes) -> list[tuple[str, bytes]]:
        """Every message received up to and including the first carrying ``payload``.

        Use a marker published after the message that must not arrive: the broker handles one
        connection's packets in order and keeps each subscriber's queue in order, so anything
        it was going to deliver from before the marker has arrived by the time the marker has.
        """
        received: list[tuple[str, bytes]] = []
        deadline = time.monotonic() + WAIT_S
        while not received or received[-1][1] != payload:
            remaining = deadline - time.monotonic()
            try:
                received.append(self.messages.get(timeout=max(0.0, remaining)))
            except queue.Empty:
                raise TimeoutError(f"{self.client_id} never received {payload!r}; got {received}") from None
        return received

    def drop(self) -> None:
        """Ends the connection without a DISCONNECT, as a device losing its network does: the
        broker then publishes the Last Will."""
        sock = self.mqtt.socket()
        assert sock is not None
        sock.shutdown(socket.SHUT_RDWR)
        self.disconnected.wait(WAIT_S)
        self.mqtt.loop_stop()

    def close(self) -> None:
        self.mqtt.disconnect()
        self.mqtt.loop_stop()


def controlplane_probe(
    broker: TlsBroker, label: str = "controlplane", *, client_id: str | None = None, persistent: bool = False
) -> Probe:
    """A connected probe logged in as the control plane's password user on the loopback listener."""
    probe = Probe(label, client_id=client_id, persistent=persistent)
    if not probe.connect(
        broker.plain_port, username=CONTROLPLANE_USER, password=broker.controlplane_password
    ):
        probe.close()
        raise AssertionError(f"the control plane could not log in:\n{broker.log_text()}")
    return probe


def device_probe(broker: TlsBroker, device: DeviceIdentity, *, client_id: str | None = None) -> Probe:
    """A probe connected on the device listener with ``device``'s certificate."""
    probe = Probe(device.device_id, client_id=client_id)
    if not probe.connect(broker.tls_port, tls=device.ssl_context()):
        probe.close()
        raise AssertionError(f"{device.device_id} could not connect:\n{broker.log_text()}")
    return probe


def disconnect_device_by_client_id_takeover(broker: TlsBroker, device_id: str) -> None:
    """Drops ``device_id``'s live connection the way the control plane does after a revocation
    (``edgefleet.controlplane.trust.revocation.end_broker_session``): it connects on the loopback
    listener with
    the device's client id (the device listener's ``use_username_as_clientid`` makes that id the
    certificate's CN), Mosquitto closes the device's connection for the newer one, and it leaves.

    A CRL only refuses new TLS handshakes; this is what ends the session already open. Call it
    after ``revoke`` so the device's reconnection attempt is refused.
    """
    if not end_broker_session(broker.controlplane_url, device_id):
        raise AssertionError(f"the takeover connection was refused:\n{broker.log_text()}")
