"""A LoRA adapter release through a real control plane (in-process, real gRPC, SQLite, Mosquitto)
and the real SmolLM2 GGUF: built over the base's bundle, pushed and deployed like any release,
verified by the device through python-tuf with its base named in the signed manifest, then
installed by a real updater over the base's llama.cpp runtime and served as smollm2:<adapter>."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from bench.lora_build import build_lora
from edgefleet.agent.config import AgentConfig
from edgefleet.agent.device.hardware_profile import HardwareProfile
from edgefleet.agent.runtimes.base import ChatMessage, SamplingParams
from edgefleet.agent.runtimes.model_table import ModelTable
from edgefleet.agent.update.adapters import AdapterBaseMissing
from edgefleet.agent.update.artifacts import ArtifactStore
from edgefleet.agent.update.state import AgentState
from edgefleet.agent.update.updater import Updater
from edgefleet.agent.update.uptane_client import GrpcMetadataFetcher, UptaneVerifier
from edgefleet.controlplane.app.server import RunningControlPlane
from edgefleet.controlplane.build.adapter_bundles import base_from_bundle, build_adapter_bundle
from edgefleet.controlplane.build.bundles import BundleOnDisk, sha256_file
from edgefleet.controlplane.trust.keys import KeyDir
from edgefleet.protos.fleet.v1 import common_pb2, device_pb2, device_pb2_grpc, operator_pb2, operator_pb2_grpc
from tests.integration.conftest import EnrolledDevice, admin_token
from tests.integration.test_controlplane_grpc import push

pytestmark = pytest.mark.integration


@pytest.fixture
def adapter_bundle(
    tmp_path: Path, keys: KeyDir, smollm2_path: Path, smollm2_bundle: BundleOnDisk
) -> BundleOnDisk:
    adapter = build_lora(smollm2_path, tmp_path / "style.gguf", rank=8, seed=3, strength=2.0)
    base = base_from_bundle(smollm2_bundle.path, name="smollm2", version=1)
    return build_adapter_bundle(
        adapter, base=base, name="style", version=1, out=tmp_path / "style-1", signers=keys.release_signers()
    )


@pytest.fixture
def sync_stub(
    controlplane: RunningControlPlane, enrolled: EnrolledDevice
) -> Iterator[device_pb2_grpc.DeviceServiceStub]:
    credentials = enrolled.certificate.grpc_credentials(controlplane.ca_pem)
    with grpc.secure_channel(f"127.0.0.1:{controlplane.device_port}", credentials) as channel:
        yield device_pb2_grpc.DeviceServiceStub(channel)


def updater_for(tmp_path: Path, models: ModelTable) -> Updater:
    config = AgentConfig(
        controlplane="127.0.0.1:1",
        state_dir=tmp_path / "agent",
        trust_path=tmp_path / "trust.json",
        n_ctx=512,
    )
    return Updater(
        config=config,
        store=ArtifactStore(config.artifact_dir, config.download_dir, config.unpacked_dir),
        models=models,
        state=AgentState(),
        on_transition=lambda state, generation, detail: None,
        available_ram=lambda: None,
        hardware=HardwareProfile(),
    )


def greedy_chat(models: ModelTable, name: str) -> str:
    lease, lora = models.lease_model(name)
    with lease as runtime:
        params = SamplingParams(max_tokens=12, temperature=0.0, seed=1, lora=lora)
        return runtime.chat([ChatMessage(role="user", content="Name a colour.")], params).text


async def test_an_adapter_release_names_its_base_signed_and_installs_over_it(
    op: operator_pb2_grpc.OperatorServiceStub,
    enrolled: EnrolledDevice,
    controlplane: RunningControlPlane,
    smollm2_bundle: BundleOnDisk,
    adapter_bundle: BundleOnDisk,
    sync_stub: device_pb2_grpc.DeviceServiceStub,
    keys: KeyDir,
    tmp_path: Path,
) -> None:
    token = admin_token(tmp_path)
    base_pushed = await push(op, smollm2_bundle.path, keys.release_signers(), token)
    pushed = await push(op, adapter_bundle.path, keys.release_signers(), token)
    assert (pushed.bundle.name, pushed.bundle.version) == ("style", 1)
    listed = await op.ListBundles(operator_pb2.ListBundlesRequest())
    manifest = next(b.manifest for b in listed.bundles if b.manifest.name == "style")
    base_sha = sha256_file(next(smollm2_bundle.path.glob("artifacts/*.gguf")))
    assert (manifest.adapter_base.name, manifest.adapter_base.version) == ("smollm2", 1)
    assert manifest.adapter_base.artifact_sha256 == base_sha

    models = ModelTable()
    updater = updater_for(tmp_path, models)
    verifier = UptaneVerifier(
        tuf_dir=tmp_path / "tuf",
        anchors=keys.trust_anchors(),
        fetcher=GrpcMetadataFetcher(lambda: sync_stub),
        device_id=enrolled.id,
    )

    # The adapter alone: refused, naming the base the operator must deploy too.
    first = await op.Deploy(operator_pb2.DeployRequest(bundle=pushed.bundle, device_ids=[enrolled.id]))
    await updater.apply(device_pb2.DesiredState(generation=first.max_generation), verifier, enrolled.stub)
    assert updater.state.phase == common_pb2.DEVICE_STATE_FAILED
    assert updater.state.last_error_kind == AdapterBaseMissing.__name__
    assert "smollm2@1" in updater.state.last_error

    # With the base deployed too, the signed manifest the device verified names the base.
    second = await op.Deploy(operator_pb2.DeployRequest(bundle=base_pushed.bundle, device_ids=[enrolled.id]))
    await updater.apply(device_pb2.DesiredState(generation=second.max_generation), verifier, enrolled.stub)
    assert updater.state.phase == common_pb2.DEVICE_STATE_ACTIVE, updater.state.last_error
    assignment = await asyncio.to_thread(verifier.refresh)  # the control plane runs on this loop
    verified = next(r for r in assignment.releases if r.name == "style")
    assert verified.adapter_base is not None
    assert (verified.adapter_base.name, verified.adapter_base.artifact_sha256) == ("smollm2", base_sha)
    assert models.served_names() == ["smollm2", "smollm2:style"]
    try:
        assert greedy_chat(models, "smollm2:style") != greedy_chat(models, "smollm2")
    finally:
        for runtime in models.runtimes():
            runtime.unload()
