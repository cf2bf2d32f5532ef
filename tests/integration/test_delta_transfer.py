"""Delta transfers end to end: a real control plane, the real SmolLM2 GGUF, a device that holds
release v1 installing a v2 with ~10% of its tensor bytes retrained fetches only what changed."""

from __future__ import annotations

import shutil
from pathlib import Path

import grpc
import pytest

from bench.chunk_inputs import middle_layers, version2
from bench.delivery_rig import Device
from edgefleet.controlplane.app.server import RunningControlPlane
from edgefleet.controlplane.build.bundles import BundleOnDisk, build_bundle, sha256_file
from edgefleet.controlplane.trust.keys import KeyDir
from edgefleet.protos.fleet.v1 import device_pb2, operator_pb2, operator_pb2_grpc
from tests.integration.conftest import EnrolledDevice, admin_token
from tests.integration.test_controlplane_grpc import push

pytestmark = pytest.mark.integration


async def publish(
    op: operator_pb2_grpc.OperatorServiceStub, bundle: Path, keys: KeyDir, token: str, device_id: str
) -> None:
    pushed = await push(op, bundle, keys.release_signers(), token)
    await op.Deploy(operator_pb2.DeployRequest(bundle=pushed.bundle, device_ids=[device_id]))


async def test_a_device_holding_v1_fetches_only_the_changed_chunks_of_v2(
    op: operator_pb2_grpc.OperatorServiceStub,
    enrolled: EnrolledDevice,
    controlplane: RunningControlPlane,
    smollm2_bundle: BundleOnDisk,
    smollm2_path: Path,
    keys: KeyDir,
    tmp_path: Path,
) -> None:
    token = admin_token(tmp_path)
    device = Device(enrolled.id, enrolled.certificate, controlplane, keys, tmp_path / "device")

    await publish(op, smollm2_bundle.path, keys, token, enrolled.id)
    v1 = await device.install("smollm2", 1)
    assert v1.info.chunks is not None and v1.info.chunks.strategy == "gguf-tensors"
    assert v1.fetched_bytes == v1.info.length  # nothing held yet: every chunk fetched

    v2_file = tmp_path / "smollm2.v2.gguf"
    changed = version2(smollm2_path, v2_file, middle_layers(smollm2_path))
    assert 0.09 < changed / v2_file.stat().st_size < 0.13
    v2_bundle = build_bundle(
        v2_file, name="smollm2", version=2, out=tmp_path / "b2", signers=keys.release_signers()
    )
    await publish(op, v2_bundle.path, keys, token, enrolled.id)
    v2 = await device.install("smollm2", 2)

    assert v2.fetched_bytes <= 0.15 * v2.info.length, (v2.fetched_bytes, v2.info.length)
    assert v2.fetched_bytes == changed  # exactly the retrained tensors (1 MiB pieces of them)
    assert v2.fetched_bytes + v2.copied_bytes == v2.info.length
    assert (
        sha256_file(v2.path)
        == v2.info.sha256
        == v2_bundle.release.artifacts[v2.info.path.split("/")[-1]].sha256
    )
    assert device.store.counters.refetched_chunks == 0

    # Ranges are bounded by the artifact: the last byte is served, one past it is refused.
    sha, length = v2.info.sha256, v2.info.length
    tail = [
        c
        async for c in enrolled.stub.FetchArtifact(
            device_pb2.FetchArtifactRequest(sha256=sha, offset=length - 1, length=1)
        )
    ]
    assert [c.data for c in tail] == [v2_file.read_bytes()[-1:]]
    with pytest.raises(grpc.aio.AioRpcError) as past:
        async for _ in enrolled.stub.FetchArtifact(
            device_pb2.FetchArtifactRequest(sha256=sha, offset=length - 1, length=2)
        ):
            pass
    assert past.value.code() == grpc.StatusCode.OUT_OF_RANGE


async def test_a_release_without_chunk_lists_still_installs_whole(
    op: operator_pb2_grpc.OperatorServiceStub,
    enrolled: EnrolledDevice,
    controlplane: RunningControlPlane,
    smollm2_path: Path,
    keys: KeyDir,
    tmp_path: Path,
) -> None:
    token = admin_token(tmp_path)
    device = Device(enrolled.id, enrolled.certificate, controlplane, keys, tmp_path / "device")
    model = tmp_path / "old.gguf"
    shutil.copyfile(smollm2_path, model)
    old = build_bundle(
        model, name="old", version=1, out=tmp_path / "old", signers=keys.release_signers(), chunk_lists=False
    )
    await publish(op, old.path, keys, token, enrolled.id)
    installed = await device.install("old", 1)
    assert installed.info.chunks is None
    assert installed.fetched_bytes == installed.info.length
    assert sha256_file(installed.path) == installed.info.sha256
    assert not device.store.chunk_index.has(installed.info.sha256)
