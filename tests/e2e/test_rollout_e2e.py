"""Rollouts with real agents and the real model: a release that fails to load on the first
wave's device stops the rollout there and is rolled back while the second device never sees
it; a good release goes wave by wave to both."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from edgefleet.controlplane.build.bundles import build_bundle
from edgefleet.controlplane.trust.keys import KeyDir, init_keys
from edgefleet.protos.fleet.v1 import common_pb2
from tests.conftest import Broker, free_port, start_broker
from tests.e2e.fleet_harness import Fleet, client_for, wait_for

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory, smollm2_path: Path) -> Iterator[Fleet]:
    work = tmp_path_factory.mktemp("rollout-fleet")
    keys: KeyDir = init_keys(work / "keys")
    (work / "broker").mkdir()
    broker: Broker = start_broker(work / "broker")
    truncated = work / "truncated.gguf"  # signed like any release, but llama.cpp cannot load it
    truncated.write_bytes(smollm2_path.read_bytes()[: smollm2_path.stat().st_size // 2])
    bundles = [
        build_bundle(
            smollm2_path, name="smollm2", version=1, out=work / "b1", signers=keys.release_signers()
        ),
        build_bundle(truncated, name="smollm2", version=2, out=work / "b2", signers=keys.release_signers()),
        build_bundle(
            smollm2_path, name="smollm2", version=3, out=work / "b3", signers=keys.release_signers()
        ),
    ]
    cluster = Fleet(
        target=f"127.0.0.1:{free_port()}",
        data_dir=work / "cp",
        work=work,
        keys=keys,
        mqtt=broker.url,
        agent_ports=[free_port(), free_port()],
    )
    cluster.start_controlplane()
    try:
        for bundle in bundles:
            cluster.push_bundle(bundle.path)
        token = cluster.fleetctl("token", "create", "--uses", "2").strip()
        cluster.agents = [cluster.start_agent(i, token) for i in range(2)]
        wait_for("two enrolled devices", lambda: len(cluster.devices()) == 2, timeout=60)
        cluster.fleetctl("deploy", "smollm2@1", "--all")
        wait_for("both devices on smollm2@1", lambda: on_release(cluster, 1), timeout=240)
        yield cluster
    finally:
        cluster.stop_all()
        broker.stop()
        cluster.print_logs()


def on_release(cluster: Fleet, version: int) -> bool:
    return all(
        d.state == common_pb2.DEVICE_STATE_ACTIVE
        and d.applied_generation == d.desired_generation
        and (d.active_bundle.name, d.active_bundle.version) == ("smollm2", version)
        for d in cluster.devices()
    )


def status(cluster: Fleet, name: str) -> dict[str, Any]:
    return dict(json.loads(cluster.fleetctl("rollout", "status", name, "--json")))


def test_a_release_that_fails_to_load_stops_at_the_first_wave_and_is_rolled_back(fleet: Fleet) -> None:
    generations = {d.device_id: d.desired_generation for d in fleet.devices()}
    fleet.fleetctl(
        "rollout", "create", "smollm2@2", "--name", "broken", "--waves", "1,2", "--soak", "1s",
        "--max-load-failure-rate", "0.01",
    )  # fmt: skip
    stopped = wait_for(
        "the rollout to roll back",
        lambda: s if (s := status(fleet, "broken"))["state"] == "ROLLOUT_STATE_ROLLED_BACK" else None,
        timeout=180,
    )
    devices = stopped["devices"]
    first = [d for d in devices if d.get("wave", 0) == 0 and d.get("generation")]
    assert len(first) == 1, devices
    assert (
        "load failure" in str(first[0].get("reason", ""))
        or first[0]["state"] == "ROLLOUT_DEVICE_STATE_ROLLED_BACK"
    )
    canary = first[0]["device_id"]
    untouched = next(d for d in generations if d != canary)
    listed = {d.device_id: d for d in fleet.devices()}
    assert listed[untouched].desired_generation == generations[untouched], "the second wave started"
    wait_for("both devices back on smollm2@1", lambda: on_release(fleet, 1), timeout=120)
    for device in fleet.devices():  # and serving all along
        reply = client_for(device.api_url).completions.create(model="smollm2", prompt="Hi", max_tokens=2)
        assert reply.choices


def test_a_good_release_goes_wave_by_wave_to_every_device(fleet: Fleet) -> None:
    fleet.fleetctl("rollout", "create", "smollm2@3", "--name", "good", "--waves", "1,2", "--soak", "1s")
    done = wait_for(
        "the rollout to complete",
        lambda: s if (s := status(fleet, "good"))["state"] == "ROLLOUT_STATE_COMPLETED" else None,
        timeout=240,
    )
    assert [w.get("gate_result", "") for w in done["wave_status"]] == ["passed", "passed"] or all(
        str(w.get("gate_result", "")).startswith("passed") for w in done["wave_status"]
    ), done["wave_status"]
    assert on_release(fleet, 3)
