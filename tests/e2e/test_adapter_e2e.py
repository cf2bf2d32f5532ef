"""A LoRA adapter release end to end: a control plane and an agent as separate processes, the real
SmolLM2 GGUF as the base and an adapter built by bench.lora_build, signed by `fleetctl bundle build
--adapter`, deployed over the base, served as smollm2:style beside smollm2 with other output,
and unloaded when undeployed while the base keeps serving."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from bench.lora_build import build_lora
from edgefleet.controlplane.build.bundles import build_bundle
from edgefleet.controlplane.trust.keys import KeyDir, init_keys
from edgefleet.protos.fleet.v1 import common_pb2
from tests.conftest import free_port
from tests.e2e.fleet_harness import Fleet, client_for, fleetctl, wait_for

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> KeyDir:
    return init_keys(tmp_path_factory.mktemp("adapter-keys") / "keys")


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory, keys: KeyDir, mosquitto: str) -> Iterator[Fleet]:
    work = tmp_path_factory.mktemp("adapter-fleet")
    fleet = Fleet(
        target=f"127.0.0.1:{free_port()}",
        data_dir=work / "cp",
        work=work,
        keys=keys,
        mqtt=mosquitto,
        agent_ports=[free_port()],
    )
    fleet.start_controlplane()
    try:
        token = fleet.fleetctl("token", "create").strip()
        fleet.agents = [fleet.start_agent(0, token)]
        wait_for("an enrolled device", lambda: len(fleet.devices()) == 1, timeout=60)
        yield fleet
    finally:
        fleet.stop_all()
        fleet.print_logs()


def settled(fleet: Fleet, names: list[str]) -> common_pb2.DeviceSummary | None:
    (device,) = fleet.devices()
    done = (
        device.applied_generation == device.desired_generation
        and device.state == common_pb2.DEVICE_STATE_ACTIVE
    )
    return device if done and sorted(m.bundle.name for m in device.models) == names else None


def chat(client: openai.OpenAI, model: str) -> str:
    reply = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "Name a colour."}],
        max_tokens=12,
        temperature=0,
        seed=1,
    )
    return reply.choices[0].message.content or ""


def test_an_adapter_deployed_over_its_base_is_served_beside_it(
    fleet: Fleet, keys: KeyDir, smollm2_path: Path
) -> None:
    base = build_bundle(
        smollm2_path, name="smollm2", version=1, out=fleet.work / "smollm2-1", signers=keys.release_signers()
    )
    adapter = build_lora(smollm2_path, fleet.work / "style.gguf", rank=8, seed=3, strength=2.0)
    built = fleet.work / "style-1"
    token, ca = fleet.operator_token, keys.tls_ca_path  # building and inspecting need no control plane
    fleetctl(
        "bundle", "build", "--keys-dir", str(keys.path), "--name", "style", "--version", "1",
        "-o", str(built), "--adapter", str(adapter), "--base", "smollm2@1", "--base-bundle", str(base.path),
        token=token, ca=ca,
    )  # fmt: skip
    inspect = ("bundle", "inspect", str(built), "--json", "--keys-dir", str(keys.path))
    inspected = json.loads(fleetctl(*inspect, token=token, ca=ca))
    assert inspected["adapterBase"]["name"] == "smollm2"
    assert fleet.push_bundle(base.path) == "smollm2@1"
    assert fleet.push_bundle(built) == "style@1"

    fleet.deploy("smollm2", 1)
    wait_for("the base serving", lambda: settled(fleet, ["smollm2"]), timeout=240)
    fleet.deploy("style", 1)
    wait_for("the adapter installed", lambda: settled(fleet, ["smollm2", "style"]), timeout=240)

    client = client_for(fleet.agent_url(0))
    assert [m.id for m in client.models.list().data] == ["smollm2", "smollm2:style"]
    assert chat(client, "smollm2:style") != chat(client, "smollm2")

    fleet.fleetctl("undeploy", "style", "--all")
    wait_for("the adapter removed", lambda: settled(fleet, ["smollm2"]), timeout=120)
    assert [m.id for m in client.models.list().data] == ["smollm2"]
    assert chat(client, "smollm2")
