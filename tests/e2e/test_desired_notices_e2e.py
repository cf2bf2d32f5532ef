"""Real agents that hear of changes through the broker (the default, ``--desired-via broker``):
a deploy reaches them as a notice on their MQTT connection; while idle they hold no connection
to the control plane; with the broker down they still learn of a deploy, by their slow poll.

One control plane process (SQLite), one Mosquitto of the test's own, two agent processes
serving the real SmolLM2 GGUF."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from edgefleet.controlplane.build.bundles import build_bundle
from edgefleet.controlplane.trust.keys import KeyDir, init_keys
from edgefleet.protos.fleet.v1 import common_pb2
from tests.conftest import Broker, free_port, start_broker
from tests.e2e.fleet_harness import Fleet, Proc, wait_for

pytestmark = pytest.mark.e2e

IDLE_S = 2.0  # --controlplane-idle-seconds
POLL_WITHOUT_BROKER_S = 2.0  # --desired-poll-without-broker-seconds
SERVER_IDLE_S = 5.0  # the control plane's --max-connection-idle-seconds


@pytest.fixture
def fleet(tmp_path: Path, smollm2_path: Path) -> Iterator[tuple[Fleet, Broker]]:
    keys: KeyDir = init_keys(tmp_path / "keys")
    broker = start_broker(tmp_path / "broker")
    fleet = Fleet(
        target=f"127.0.0.1:{free_port()}",
        data_dir=tmp_path / "cp",
        work=tmp_path,
        keys=keys,
        mqtt=broker.url,
        agent_ports=[free_port(), free_port()],
        # The control plane's backstop too (default ten minutes): on a loaded machine gRPC's
        # client idle timer alone sometimes kept a connection past the wait below.
        serve_options=["--max-connection-idle-seconds", str(SERVER_IDLE_S)],
        agent_options=[
            "--controlplane-idle-seconds",
            str(IDLE_S),
            "--desired-poll-without-broker-seconds",
            str(POLL_WITHOUT_BROKER_S),
        ],
    )
    fleet.start_controlplane()
    try:
        for version in (1, 2, 3):
            bundle = build_bundle(
                smollm2_path,
                name="smollm2",
                version=version,
                out=tmp_path / f"b{version}",
                signers=keys.release_signers(),
            )
            fleet.push_bundle(bundle.path)
        token = fleet.fleetctl("token", "create", "--uses", "2").strip()
        fleet.agents = [fleet.start_agent(i, token) for i in range(2)]
        wait_for("two enrolled devices", lambda: len(fleet.devices()) == 2, timeout=60)
        yield fleet, broker
    finally:
        fleet.stop_all()
        broker.stop()
        fleet.print_logs()


def serving(fleet: Fleet, version: int) -> bool:
    return all(
        d.state == common_pb2.DEVICE_STATE_ACTIVE and d.active_bundle.version == version
        for d in fleet.devices()
    )


def device_connections(agent: Proc, fleet: Fleet) -> int:
    """The agent's established connections to the control plane's device port."""
    return sum(
        1
        for c in psutil.Process(agent.popen.pid).net_connections(kind="tcp")
        if c.status == psutil.CONN_ESTABLISHED and c.raddr and c.raddr.port == fleet.device_port
    )


def test_deploys_arrive_as_notices_idle_agents_hold_no_connection_and_polls_cover_a_dead_broker(
    fleet: tuple[Fleet, Broker],
) -> None:
    cluster, broker = fleet
    cluster.deploy("smollm2", 1)
    wait_for("both agents serving smollm2@1", lambda: serving(cluster, 1), timeout=240)

    # Idle: once the control-plane channel went unused for IDLE_S, no agent holds a connection
    # to it; the broker carries the only connection each device keeps.
    wait_for(
        "the agents to let their control-plane connections go",
        lambda: all(device_connections(agent, cluster) == 0 for agent in cluster.agents),
        timeout=2 * SERVER_IDLE_S + 50,
    )

    started = time.monotonic()
    cluster.deploy("smollm2", 2)
    wait_for("both agents serving smollm2@2", lambda: serving(cluster, 2), timeout=240)
    notice_to_serving = time.monotonic() - started
    for agent in cluster.agents:
        assert "desired-state notice: generation" in agent.log.read_text(errors="replace")

    # The broker is down: the agents poll every POLL_WITHOUT_BROKER_S and still learn of a deploy.
    broker.stop()
    time.sleep(1)
    cluster.deploy("smollm2", 3)
    wait_for("both agents serving smollm2@3 with the broker down", lambda: serving(cluster, 3), timeout=240)
    for agent in cluster.agents:
        assert agent.alive
    print(f"notice to both serving a new release: {notice_to_serving:.1f}s")
