"""The production files in deploy/ work as written: Mosquitto starts from our config, keeps
queued telemetry across a restart and refuses clients it must refuse, and the systemd units
pass systemd's own checks.

The broker is tests/mqtt_tls.py's: deploy/mosquitto/mosquitto.conf with only paths, ports and
the run-as user changed, next to the real ACL file, with certificates from the fleet CA. What a
device certificate lets a device do on it is tested in test_mqtt_device_access.py.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from edgefleet.controlplane.app.settings import Settings
from edgefleet.controlplane.telemetry.ingest import replica_client_id
from edgefleet.protos.fleet.topics import (
    TopicKind,
    device_prefix,
    presence_topic,
    shared,
    status_topic,
    telemetry_subscription,
    telemetry_topic,
)
from tests.mqtt_tls import (
    NO_MATCHING_SUBSCRIBERS,
    NOT_AUTHORIZED,
    Probe,
    TlsBroker,
    controlplane_probe,
    device_probe,
    mosquitto_programs,
    start_tls_broker,
    wait_for,
)

pytestmark = pytest.mark.integration

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
SYSTEMD_ANALYZE = shutil.which("systemd-analyze")

needs_mosquitto = pytest.mark.skipif(
    mosquitto_programs() is None, reason="mosquitto is not installed: run dev/setup"
)


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsBroker]:
    running = start_tls_broker(tmp_path_factory.mktemp("mosquitto"))
    yield running
    running.stop()


# --- Mosquitto ---


@needs_mosquitto
def test_mosquitto_conf_runs_and_persists_across_a_restart(tmp_path: Path) -> None:
    """Telemetry a device sends while the control plane is away waits in the control plane's
    persistent session (MQTT v5 clean start off with a Session Expiry Interval, and the shared
    subscription, as edgefleet.controlplane.telemetry.ingest makes them), and survives a broker
    restart: SIGTERM
    saves the database (exit status 0) and the next start loads it."""
    broker = start_tls_broker(tmp_path)
    replica = replica_client_id("a")
    try:
        device = broker.issue_device("dev-c")
        topic = telemetry_topic(device.device_id, TopicKind.HEARTBEAT)
        subscriber = controlplane_probe(broker, client_id=replica, persistent=True)
        assert not subscriber.subscribe(shared(telemetry_subscription())).is_failure
        subscriber.close()
        # Offline before the device publishes, so the message is queued rather than sent.
        wait_for(
            lambda: f"Client {replica} disconnected." in broker.log_text(),
            "the control plane's disconnection",
        )
        sender = device_probe(broker, device)
        try:
            sent = sender.publish(topic, b"queued while away")  # PUBACK: queued for the session
        finally:
            sender.close()

        broker.stop()
        stopped_with = broker.process.returncode
        broker.start()

        subscriber = controlplane_probe(broker, client_id=replica, persistent=True)
        try:
            received = subscriber.receive_until(b"queued while away")
        finally:
            subscriber.close()
    finally:
        broker.stop()

    assert not sent.is_failure, sent
    assert stopped_with == 0, broker.log_text()
    assert (broker.work / "data" / "mosquitto.db").is_file(), "persistence is off or writes elsewhere"
    assert subscriber.session_present
    assert received == [(topic, b"queued while away")]
    assert broker.process.returncode == 0
    # Mosquitto's own errors ("Error: ..."), not a client's failed handshake ("OpenSSL Error"),
    # which the readiness check's bare TCP connection to the TLS listener can cause.
    assert [line for line in broker.log_text().splitlines() if line.startswith("Error")] == []


@needs_mosquitto
def test_after_a_restart_a_shared_subscription_waits_for_its_subscriber(tmp_path: Path) -> None:
    """What the agent's publisher relies on: Mosquitto 2.0.11 restores a persistent session's
    queued messages but not its shared subscriptions, so after a restart nothing matches the
    control plane's filters until it subscribes again, and a device's v5 PUBACK says so (0x10,
    no matching subscribers). The publisher keeps such records in its outbox and resends them."""
    broker = start_tls_broker(tmp_path)
    replica = replica_client_id("a")
    try:
        device = broker.issue_device("dev-r")
        topic = telemetry_topic(device.device_id, TopicKind.HEARTBEAT)
        subscriber = controlplane_probe(broker, client_id=replica, persistent=True)
        assert not subscriber.subscribe(shared(telemetry_subscription())).is_failure
        subscriber.close()
        broker.stop()
        broker.start()
        sender = device_probe(broker, device)
        try:
            unheard = sender.publish(topic, b"before the control plane is back")
            subscriber = controlplane_probe(broker, client_id=replica, persistent=True)
            assert subscriber.session_present
            assert not subscriber.subscribe(shared(telemetry_subscription())).is_failure
            heard = sender.publish(topic, b"after it subscribed")
            received = subscriber.receive_until(b"after it subscribed")
            subscriber.close()
        finally:
            sender.close()
    finally:
        broker.stop()

    assert unheard.value == NO_MATCHING_SUBSCRIBERS, unheard
    assert heard.value == 0, heard
    assert received == [(topic, b"after it subscribed")]


@needs_mosquitto
def test_anonymous_client_is_refused(broker: TlsBroker) -> None:
    client = Probe("anonymous")
    try:
        accepted = client.connect(broker.plain_port)
    finally:
        client.close()

    assert not accepted
    assert client.connack is not None and client.connack.value == NOT_AUTHORIZED, client.connack


@needs_mosquitto
def test_control_plane_cannot_publish_presence_or_status(broker: TlsBroker) -> None:
    """Nor can it plant a retained presence or status for a device."""
    device = broker.issue_device("dev-p")
    controlplane = controlplane_probe(broker)
    try:
        forged = [
            controlplane.publish(presence_topic(device.device_id), b"forged", retain=True),
            controlplane.publish(status_topic(device.device_id), b"forged", retain=True),
        ]
    finally:
        controlplane.close()
    assert [code.value for code in forged] == [NOT_AUTHORIZED, NOT_AUTHORIZED]


@needs_mosquitto
def test_control_plane_cannot_publish(broker: TlsBroker) -> None:
    """The control plane's user may read every device's telemetry but write nothing: it can
    neither forge telemetry into its own ingestion nor send anything to a device."""
    device = broker.issue_device("dev-d")
    topic = telemetry_topic(device.device_id, TopicKind.DEPLOYMENT)
    controlplane = controlplane_probe(broker)
    receiver = device_probe(broker, device)
    try:
        assert not controlplane.subscribe(telemetry_subscription()).is_failure
        assert not receiver.subscribe(f"{device_prefix(device.device_id)}/#").is_failure
        forged = controlplane.publish(topic, b"from the control plane")
        # The PUBACK means the broker has dealt with the forgery before the device's own message
        # reaches it, and each subscriber's queue stays in order.
        own = receiver.publish(topic, b"the device's own")

        received_by_device = receiver.receive_until(b"the device's own")
        received_by_controlplane = controlplane.receive_until(b"the device's own")
    finally:
        controlplane.close()
        receiver.close()

    assert forged.value == NOT_AUTHORIZED, forged
    assert not own.is_failure, own
    assert received_by_device == [(topic, b"the device's own")]
    assert received_by_controlplane == [(topic, b"the device's own")]


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
        f"{INSTALL_PREFIX}fleetctl serve --listen 0.0.0.0:7443 --device-listen 0.0.0.0:7444 "
        "--data-dir /var/lib/edgefleet --keys-dir /var/lib/edgefleet/keys --mqtt ${EDGEFLEET_MQTT}"
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


CRL_UNITS = ("edgefleet-crl.path", "edgefleet-crl.service")


def test_crl_units_hand_the_control_planes_crl_to_mosquitto() -> None:
    """The path unit watches where the control plane writes its CRL (its data dir under
    DynamicUser's private state), and the service installs it where mosquitto.conf reads it."""
    path_unit = _directives(DEPLOY / "systemd" / "edgefleet-crl.path")
    service = _directives(DEPLOY / "systemd" / "edgefleet-crl.service")
    controlplane = _directives(DEPLOY / "systemd" / "edgefleet-controlplane.service")
    data_dir = controlplane["ExecStart"][0].split("--data-dir ")[1].split()[0]
    written = Settings(data_dir=Path(data_dir)).crl_path  # what `fleetctl serve` writes
    private = Path("/var/lib/private") / written.relative_to("/var/lib")
    assert path_unit["PathChanged"] == [str(private.parent)]
    assert path_unit["Unit"] == ["edgefleet-crl.service"]
    crlfile = next(
        line.split()[1]
        for line in (DEPLOY / "mosquitto" / "mosquitto.conf").read_text().splitlines()
        if line.startswith("crlfile ")
    )
    copy, reload = service["ExecStart"]
    assert f"install -D -m 0644 {private} {crlfile}.new" in copy and f"mv -f {crlfile}.new {crlfile}'" in copy
    assert reload == "/bin/systemctl try-reload-or-restart mosquitto.service"
    assert service["ReadWritePaths"] == [str(Path(crlfile).parent)]


@pytest.mark.skipif(SYSTEMD_ANALYZE is None, reason="no systemd-analyze")
def test_crl_units_verify(tmp_path: Path) -> None:
    copies = []
    for unit in CRL_UNITS:
        copy = tmp_path / unit
        copy.write_text((DEPLOY / "systemd" / unit).read_text())
        copies.append(copy)
    result = _verify(copies)
    assert result.returncode == 0, result.stderr
    assert [line for line in result.stderr.splitlines() if "edgefleet-crl" in line] == []
