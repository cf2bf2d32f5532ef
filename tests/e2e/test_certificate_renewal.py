"""A real agent renews its short-lived certificate, twice, while it serves: same process, no
failed request, and after the first certificate expired it still installs a new release over
gRPC and reconnects to Mosquitto's mutual-TLS listener with the renewed certificate."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import httpx
import pytest

from edgefleet.agent.device.identity import DeviceIdentity, save_identity
from edgefleet.agent.device.tls import csr_pem, new_key, store_certificate
from edgefleet.controlplane.build.bundles import build_bundle
from edgefleet.controlplane.cli.demo import agent_command
from edgefleet.controlplane.trust.ca import load_ca
from edgefleet.controlplane.trust.keys import init_keys
from edgefleet.protos.fleet.v1 import common_pb2, operator_pb2
from tests.conftest import free_port
from tests.e2e.fleet_harness import Fleet, client_for, spawn, wait_for
from tests.mqtt_tls import TlsBroker, disconnect_device_by_client_id_takeover, start_tls_broker

pytestmark = pytest.mark.e2e

VALIDITY_SECONDS = 30  # renewed at two thirds: about every 20 s


@pytest.fixture
def fleet(tmp_path: Path, smollm2_path: Path) -> Iterator[tuple[Fleet, TlsBroker]]:
    keys = init_keys(tmp_path / "keys")
    ca = load_ca(keys.path)
    assert ca is not None
    broker = start_tls_broker(tmp_path / "broker", ca=ca)
    fleet = Fleet(
        target=f"127.0.0.1:{free_port()}",
        data_dir=tmp_path / "cp",
        work=tmp_path,
        keys=keys,
        mqtt=broker.controlplane_url,
        agent_ports=[free_port()],
        serve_options=[
            "--mqtt-advertise",
            broker.device_url,
            "--crl-file",
            str(broker.crl_path),
            "--device-cert-validity",
            f"{VALIDITY_SECONDS}s",
        ],
    )
    try:
        fleet.start_controlplane()
        for version in (1, 2):
            bundle = build_bundle(
                smollm2_path,
                name="smollm2",
                version=version,
                out=tmp_path / f"smollm2-{version}",
                signers=keys.release_signers(),
            )
            fleet.push_bundle(bundle.path)
        yield fleet, broker
    finally:
        fleet.stop_all()
        fleet.print_logs()
        broker.stop()


def active_version(fleet: Fleet) -> int | None:
    devices = fleet.devices()
    if devices and devices[0].state == common_pb2.DEVICE_STATE_ACTIVE:
        return devices[0].active_bundle.version
    return None


def test_the_agent_renews_its_certificate_while_serving(fleet: tuple[Fleet, TlsBroker]) -> None:
    fleet_, broker = fleet
    token = fleet_.fleetctl("token", "create").strip()
    agent = fleet_.start_agent(0, token)
    fleet_.agents = [agent]
    wait_for("the device to enroll", lambda: len(fleet_.devices()) == 1, timeout=60)
    fleet_.deploy("smollm2", 1)
    wait_for("smollm2@1 active", lambda: active_version(fleet_) == 1, timeout=120)
    device_id = fleet_.devices()[0].device_id
    as_device = f"u'{device_id}')"  # Mosquitto's connect line for a login by this certificate
    wait_for("telemetry over mutual TLS", lambda: as_device in broker.log_text(), timeout=30)

    served, failures = 0, []
    stop = threading.Event()

    def keep_asking() -> None:
        nonlocal served
        client = client_for(fleet_.agent_url(0), timeout=60)
        while not stop.is_set():
            try:
                client.completions.create(model="smollm2", prompt="Hello", max_tokens=4, temperature=0)
                served += 1
            except Exception as exc:  # every failure is the finding
                failures.append(repr(exc))

    asker = threading.Thread(target=keep_asking)
    asker.start()
    try:
        log = fleet_.agent_log(0)
        wait_for(
            "two renewals",
            lambda: log.read_text().count("renewed the device certificate") >= 2,
            timeout=3 * VALIDITY_SECONDS,
        )
    finally:
        stop.set()
        asker.join(timeout=60)
    assert agent.popen.poll() is None, "the agent restarted or died"
    assert failures == [] and served > 0

    # The enrollment certificate has expired by now. A control-plane restart drops every
    # connection, so the agent must handshake again: a new release still arrives over gRPC...
    fleet_.controlplane.stop()
    fleet_.start_controlplane()
    fleet_.deploy("smollm2", 2)
    wait_for("smollm2@2 active", lambda: active_version(fleet_) == 2, timeout=120)
    # ...and a fresh MQTT connection presents the renewed certificate.
    connections = broker.log_text().count(as_device)
    disconnect_device_by_client_id_takeover(broker, device_id)
    wait_for(
        "the agent to reconnect with its renewed certificate",
        lambda: broker.log_text().count(as_device) > connections,
        timeout=30,
    )
    stub = fleet_.stub()

    def heartbeats() -> int:
        rows = stub.QueryTelemetry(operator_pb2.QueryTelemetryRequest(kind="heartbeat", limit=10000)).rows
        return len(rows)

    before = heartbeats()
    wait_for("heartbeats after the reconnect", lambda: heartbeats() > before + 1, timeout=30)
    audit = fleet_.fleetctl("audit", "list", "--action", "device.renew", "--json")
    assert audit.count(device_id) >= 2
    assert agent.popen.poll() is None


def test_an_expired_certificate_leaves_the_agent_serving_offline(tmp_path: Path) -> None:
    """A device that stayed off past its certificate's expiry cannot reach the control plane,
    but its local API must keep running: the agent says why and serves what it has."""
    keys = init_keys(tmp_path / "keys")
    ca = load_ca(keys.path)
    assert ca is not None
    state = tmp_path / "agent"
    state.mkdir()
    key = new_key()
    issued = ca.sign_device_csr(csr_pem(key, "x"), device_id="dev-0ff11e", validity=timedelta(seconds=1))
    store_certificate(state / "device.pem", key, issued.certificate_pem)
    save_identity(
        state / "identity.json",
        DeviceIdentity("dev-0ff11e", "mqtt://127.0.0.1:1", f"127.0.0.1:{free_port()}", ":1"),
    )
    time.sleep(1.5)  # past not_after
    port = free_port()
    command = agent_command(target="127.0.0.1:1", token="", trust=keys.trust_path, state_dir=state, port=port)
    log = tmp_path / "agent.log"
    agent = spawn([arg for arg in command[2:] if arg not in ("--token", "")], log)
    try:
        health = wait_for("the local API", lambda: _healthz(port), timeout=60)
        assert health["status"] == "unavailable"  # the API answers; this device has no model installed
        wait_for(
            "the explanation", lambda: "serving the installed model offline" in log.read_text(), timeout=30
        )
        assert "expired" in log.read_text()
        time.sleep(2)
        assert agent.popen.poll() is None, "the agent exited instead of serving offline"
    finally:
        agent.stop()


def _healthz(port: int) -> dict[str, object] | None:
    try:
        response = httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2)
    except httpx.TransportError:
        return None
    body: dict[str, object] = response.json()  # 200 with a model, 503 without: both mean "up"
    return body
