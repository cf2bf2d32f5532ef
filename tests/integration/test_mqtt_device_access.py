"""Device access on the real broker: what a device certificate from the fleet CA lets a device
do on Mosquitto running deploy/mosquitto's config, and how a revoked device is shut out.

Each device is confined by its certificate's CN (its device id), whatever username or client
id it claims, to its own topic subtree; certificates that are missing (even from a client with
valid password credentials), from another CA, or revoked are refused in the TLS handshake;
and a revoked device that is still connected is disconnected at once by taking over its
client id. MQTT v5 throughout, so PUBACK and SUBACK reason codes say what the broker decided.

"Never receives" is checked without waiting for silence: the message that must not arrive is
sent before a marker on an ordered path, and receiving the marker means it would have arrived.
"""

from __future__ import annotations

import re
import ssl
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from edgefleet.controlplane.trust.ca import init_ca
from edgefleet.protos.fleet.topics import (
    TopicKind,
    desired_topic,
    device_prefix,
    presence_subscription,
    presence_topic,
    shared,
    status_subscription,
    status_topic,
    telemetry_subscription,
    telemetry_topic,
)
from tests.mqtt_tls import (
    CONTROLPLANE_USER,
    NOT_AUTHORIZED,
    WAIT_S,
    DeviceIdentity,
    Probe,
    TlsBroker,
    controlplane_probe,
    device_probe,
    disconnect_device_by_client_id_takeover,
    issue_device,
    mosquitto_programs,
    start_tls_broker,
    trust_only_context,
    wait_for,
)

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(mosquitto_programs() is None, reason="mosquitto is not installed: run dev/setup"),
]

# What Mosquitto logs when the TLS handshake fails on the client's certificate.
NO_CERTIFICATE = "peer did not return a certificate"
VERIFY_FAILED = "certificate verify failed"
# The last line Mosquitto logs for a refused handshake, after the reason. The client can see the
# refusal before it is written.
REFUSAL_LOGGED = re.compile(r"^Client (<unknown> disconnected|connection from \S+ failed)", re.MULTILINE)


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsBroker]:
    running = start_tls_broker(tmp_path_factory.mktemp("mosquitto-tls"))
    yield running
    running.stop()


def _new_device(broker: TlsBroker, name: str) -> DeviceIdentity:
    # Unique ids: the broker and its CRL are shared by the module's tests.
    return broker.issue_device(f"{name}-{uuid.uuid4().hex[:8]}")


@pytest.fixture
def device_a(broker: TlsBroker) -> DeviceIdentity:
    return _new_device(broker, "dev-a")


@pytest.fixture
def device_b(broker: TlsBroker) -> DeviceIdentity:
    return _new_device(broker, "dev-b")


@pytest.fixture
def controlplane(broker: TlsBroker) -> Iterator[Probe]:
    """The control plane's subscriptions, as edgefleet.controlplane.telemetry.ingest makes them:
    shared, to every
    device's telemetry, presence and status. Without the retained messages the module's earlier
    tests left (a new shared subscription gets them on Mosquitto 2.0.11): each test sees its own."""
    probe = controlplane_probe(broker)
    for subscription in (telemetry_subscription(), presence_subscription(), status_subscription()):
        assert not probe.subscribe(shared(subscription), retained=False).is_failure
    yield probe
    probe.close()


def try_device_listener(
    broker: TlsBroker,
    label: str,
    tls: ssl.SSLContext,
    *,
    username: str | None = None,
    password: str | None = None,
) -> tuple[bool, str]:
    """One connection attempt on the device listener: (accepted?, what the broker logged)."""
    mark = len(broker.log_text())
    probe = Probe(label)
    try:
        accepted = probe.connect(broker.tls_port, tls=tls, username=username, password=password)
    finally:
        probe.close()
    if not accepted:
        wait_for(lambda: REFUSAL_LOGGED.search(broker.log_text(), mark) is not None, "the refusal's log")
    return accepted, broker.log_text()[mark:]


# --- identity and topic confinement ---


def test_device_certificate_is_its_identity(
    broker: TlsBroker, device_a: DeviceIdentity, device_b: DeviceIdentity, controlplane: Probe
) -> None:
    """use_identity_as_username and use_username_as_clientid: the certificate's CN is the
    device's username and client id, so what the ACL's %u confines it to, even when it claims
    the control plane's name, password and client id. The claim gains none of the control
    plane's reads, and the device's own telemetry arrives under its own id."""
    own_topic = telemetry_topic(device_a.device_id, TopicKind.HEARTBEAT)
    b_topic = telemetry_topic(device_b.device_id, TopicKind.HEARTBEAT)
    mark = len(broker.log_text())
    device = Probe("impersonator", client_id=CONTROLPLANE_USER)
    other = device_probe(broker, device_b)
    try:
        accepted = device.connect(
            broker.tls_port,
            tls=device_a.ssl_context(),
            username=CONTROLPLANE_USER,
            password=broker.controlplane_password,
        )
        assert accepted, broker.log_text()
        device.subscribe(telemetry_subscription())  # granted or not, only a's own may arrive
        assert not other.publish(b_topic, b"b's").is_failure
        own = device.publish(own_topic, b"a's own")  # after b's PUBACK: see the read test below

        received = device.receive_until(b"a's own")
    finally:
        device.close()
        other.close()
    log = broker.log_text()[mark:]

    device_id = re.escape(device_a.device_id)
    assert re.search(rf"as {device_id} \(.*u'{device_id}'\)", log), log
    assert f"u'{CONTROLPLANE_USER}'" not in log
    assert not own.is_failure, own
    assert received == [(own_topic, b"a's own")]
    # The control plane reads everyone's telemetry: b's, then a's under a's own id.
    assert controlplane.receive_until(b"a's own") == [(b_topic, b"b's"), (own_topic, b"a's own")]


def test_device_cannot_publish_on_another_devices_topics(
    broker: TlsBroker, device_a: DeviceIdentity, device_b: DeviceIdentity, controlplane: Probe
) -> None:
    forged_topic = telemetry_topic(device_b.device_id, TopicKind.INFERENCE)
    own_topic = telemetry_topic(device_a.device_id, TopicKind.INFERENCE)
    device = device_probe(broker, device_a)
    try:
        forged = device.publish(forged_topic, b"forged by a")
        marker = device.publish(own_topic, b"a's own")  # same connection: handled after the forgery
    finally:
        device.close()

    assert forged.value == NOT_AUTHORIZED, forged
    assert not marker.is_failure, marker
    assert controlplane.receive_until(b"a's own") == [(own_topic, b"a's own")]


def test_device_cannot_read_another_devices_topics(
    broker: TlsBroker, device_a: DeviceIdentity, device_b: DeviceIdentity
) -> None:
    """Mosquitto 2.0.11's acl_file does not check SUBSCRIBE: the SUBACK grants a device a
    subscription to another device's subtree (reason code 1, not 0x87), and the read rules are
    applied to every message instead, so nothing of the other device's is ever delivered. The
    test holds the delivery to account, and accepts a refused SUBACK should a later Mosquitto
    send one."""
    device = device_probe(broker, device_a)
    other = device_probe(broker, device_b)
    try:
        foreign = [
            device.subscribe(f"{device_prefix(device_b.device_id)}/#"),
            device.subscribe(telemetry_subscription()),  # everyone's telemetry, wildcards and all
        ]
        assert not device.subscribe(f"{device_prefix(device_a.device_id)}/#").is_failure
        secret_topic = telemetry_topic(device_b.device_id, TopicKind.INFERENCE)
        assert not other.publish(secret_topic, b"b's secret").is_failure
        # The broker has routed b's message (PUBACK) before a's marker reaches it, and keeps a's
        # delivery queue in order.
        own_topic = telemetry_topic(device_a.device_id, TopicKind.HEARTBEAT)
        assert not device.publish(own_topic, b"a's own").is_failure

        received = device.receive_until(b"a's own")
    finally:
        device.close()
        other.close()

    assert all(code.value in (1, NOT_AUTHORIZED) for code in foreign), foreign
    # a's own subtree and the telemetry wildcard both match a's marker: one copy each.
    assert {payload for _, payload in received} == {b"a's own"}, received


def test_the_control_plane_announces_desired_state_to_each_device_alone(
    broker: TlsBroker, device_a: DeviceIdentity, device_b: DeviceIdentity
) -> None:
    """Desired-state notices (controlplane/fleet/broker_notices.py): the control plane's user
    may publish on every device's desired topic, and each device receives its own only."""
    announcer = controlplane_probe(broker)
    device = device_probe(broker, device_a)
    try:
        assert not device.subscribe(desired_topic(device_a.device_id)).is_failure
        device.subscribe(desired_topic(device_b.device_id))  # granted on 2.0.11; delivery is checked
        assert not announcer.publish(desired_topic(device_b.device_id), b"b's notice").is_failure
        assert not announcer.publish(desired_topic(device_a.device_id), b"a's notice").is_failure
        received = device.receive_until(b"a's notice")
    finally:
        device.close()
        announcer.close()
    assert received == [(desired_topic(device_a.device_id), b"a's notice")], received


# --- presence and status: retained messages and the Last Will ---


def test_device_publishes_its_retained_presence_status_and_last_will(
    broker: TlsBroker, device_a: DeviceIdentity, controlplane: Probe
) -> None:
    """What the agent publishes outside its telemetry streams: retained Presence and status on
    its own topics, and a Last Will on its presence topic that the broker publishes when the
    connection dies. All of it reaches the control plane's shared subscriptions."""
    presence, status = presence_topic(device_a.device_id), status_topic(device_a.device_id)
    device = Probe(device_a.device_id, will=(presence, b"offline (will)"))
    assert device.connect(broker.tls_port, tls=device_a.ssl_context()), broker.log_text()
    online = device.publish(presence, b"online", retain=True)
    latest = device.publish(status, b"status", retain=True)

    device.drop()  # no DISCONNECT: the broker publishes the will

    received = controlplane.receive_until(b"offline (will)")
    late = controlplane_probe(broker, "late-reader")
    try:
        late.subscribe(presence)
        late.subscribe(status)
        retained = {late.messages.get(timeout=WAIT_S) for _ in range(2)}
    finally:
        late.close()
    assert not online.is_failure and not latest.is_failure, (online, latest)
    assert received == [(presence, b"online"), (status, b"status"), (presence, b"offline (will)")]
    assert retained == {(presence, b"offline (will)"), (status, b"status")}


def test_device_cannot_set_another_devices_presence_or_status(
    broker: TlsBroker, device_a: DeviceIdentity, device_b: DeviceIdentity, controlplane: Probe
) -> None:
    """Retained publishes are checked like any other, and a Last Will is checked against the
    device's write rules when the broker publishes it: Mosquitto 2.0.11 accepts the CONNECT of
    a device whose will names another device's topic, then drops the will."""
    b_presence, b_status = presence_topic(device_b.device_id), status_topic(device_b.device_id)
    device = Probe(device_a.device_id, will=(b_presence, b"b is offline, says a"))
    accepted = device.connect(broker.tls_port, tls=device_a.ssl_context())
    forged = [device.publish(b_presence, b"b is online, says a", retain=True)]
    forged.append(device.publish(b_status, b"b's status, says a", retain=True))
    device.drop()
    own = device_probe(broker, device_a)  # after the will would have been published
    try:
        marker = own.publish(presence_topic(device_a.device_id), b"a's own", retain=True)
    finally:
        own.close()

    received = controlplane.receive_until(b"a's own")
    assert accepted, broker.log_text()
    assert [code.value for code in forged] == [NOT_AUTHORIZED, NOT_AUTHORIZED]
    assert not marker.is_failure
    assert received == [(presence_topic(device_a.device_id), b"a's own")]


def test_device_cannot_read_another_devices_retained_presence_or_status(
    broker: TlsBroker, device_a: DeviceIdentity, device_b: DeviceIdentity
) -> None:
    other = device_probe(broker, device_b)
    try:
        assert not other.publish(presence_topic(device_b.device_id), b"b online", retain=True).is_failure
        assert not other.publish(status_topic(device_b.device_id), b"b status", retain=True).is_failure
    finally:
        other.close()
    device = device_probe(broker, device_a)
    try:
        device.subscribe(presence_subscription())  # every device's, retained ones included
        device.subscribe(status_subscription())
        own = presence_topic(device_a.device_id)
        assert not device.publish(own, b"a's own").is_failure
        received = device.receive_until(b"a's own")
    finally:
        device.close()
    assert received == [(own, b"a's own")]


# --- who may connect at all ---


def test_device_listener_refuses_a_client_without_a_certificate(broker: TlsBroker) -> None:
    """require_certificate: a password, even the control plane's, does not stand in for one."""
    accepted, log = try_device_listener(
        broker,
        "no-certificate",
        trust_only_context(broker.ca_path),
        username=CONTROLPLANE_USER,
        password=broker.controlplane_password,
    )

    assert not accepted
    assert NO_CERTIFICATE in log


def test_device_listener_refuses_a_certificate_from_another_ca(broker: TlsBroker, tmp_path: Path) -> None:
    other_ca = init_ca(tmp_path / "other-ca")
    other_ca_path = tmp_path / "other-ca.pem"
    other_ca_path.write_bytes(other_ca.certificate_pem)
    # Same device id as a real device would have; only the issuer differs.
    impostor = issue_device(other_ca, other_ca_path, tmp_path / "devices", f"dev-{uuid.uuid4().hex[:8]}")
    context = trust_only_context(broker.ca_path)  # it does trust the real broker
    context.load_cert_chain(impostor.cert_path, impostor.key_path)

    accepted, log = try_device_listener(broker, "other-ca", context)

    assert not accepted
    assert VERIFY_FAILED in log


def test_server_certificate_cannot_log_in_as_the_control_plane(broker: TlsBroker) -> None:
    """The fleet CA's server certificates carry CN edgefleet-controlplane, the user the ACL lets
    read every device's telemetry; use_identity_as_username would make that the username. They
    are refused as client certificates because their extended key usage is serverAuth only."""
    context = trust_only_context(broker.ca_path)
    context.load_cert_chain(broker.work / "broker.crt", broker.work / "broker.key")

    accepted, log = try_device_listener(broker, "server-certificate", context)

    assert not accepted
    assert VERIFY_FAILED in log
    assert f"u'{CONTROLPLANE_USER}'" not in log


# --- revocation ---


def test_revoked_certificate_is_refused_after_a_reload(
    broker: TlsBroker, device_a: DeviceIdentity, device_b: DeviceIdentity
) -> None:
    """A new CRL takes effect on SIGHUP (``systemctl reload mosquitto``), without a restart."""
    before, _ = try_device_listener(broker, "before-revocation", device_a.ssl_context())

    broker.revoke(device_a.serial)

    after, log = try_device_listener(broker, "after-revocation", device_a.ssl_context())
    other_device, _ = try_device_listener(broker, "unrevoked", device_b.ssl_context())
    assert before, "the certificate was refused before it was revoked"
    assert not after
    assert VERIFY_FAILED in log
    assert other_device, "revoking one device locked out another"


def test_connected_revoked_device_is_disconnected_by_client_id_takeover(
    broker: TlsBroker, device_a: DeviceIdentity, controlplane: Probe
) -> None:
    """The CRL is checked in the TLS handshake only, so an open connection outlives the
    revocation; taking over the device's client id from the loopback listener ends it, and the
    device's reconnection is refused."""
    topic = telemetry_topic(device_a.device_id, TopicKind.HEARTBEAT)
    device = device_probe(broker, device_a)
    try:
        broker.revoke(device_a.serial)
        still_open = device.publish(topic, b"after revocation")

        disconnect_device_by_client_id_takeover(broker, device_a.device_id)

        dropped = device.disconnected.wait(WAIT_S)
    finally:
        device.close()
    reconnected, log = try_device_listener(broker, "reconnect", device_a.ssl_context())

    assert not still_open.is_failure, "revocation alone is expected to leave open connections be"
    assert dropped, f"the revoked device is still connected:\n{broker.log_text()}"
    assert not reconnected
    assert VERIFY_FAILED in log
    assert controlplane.receive_until(b"after revocation") == [(topic, b"after revocation")]


def test_device_cannot_take_over_another_client_id(
    broker: TlsBroker, device_a: DeviceIdentity, device_b: DeviceIdentity
) -> None:
    """use_username_as_clientid on the device listener: a device's client id is its CN whatever
    it asks for, so it can disconnect neither another device nor the control plane (whose
    session holds the telemetry queued while it is away) by reusing their client ids."""
    victim = device_probe(broker, device_a)
    controlplane = controlplane_probe(broker, client_id=CONTROLPLANE_USER)
    try:
        for client_id in (device_a.device_id, CONTROLPLANE_USER):
            # Mosquitto closes the older connection before it answers the newer one's CONNECT.
            attacker = device_probe(broker, device_b, client_id=client_id)
            attacker.close()
        own_topic = telemetry_topic(device_a.device_id, TopicKind.HEARTBEAT)
        victim_code = victim.publish(own_topic, b"still here")
        controlplane_code = controlplane.subscribe(telemetry_subscription())
        victim_dropped = victim.disconnected.is_set()
        controlplane_dropped = controlplane.disconnected.is_set()
    finally:
        victim.close()
        controlplane.close()

    assert not victim_dropped and not victim_code.is_failure
    assert not controlplane_dropped and not controlplane_code.is_failure
