"""The control plane over real gRPC sockets, a real SQLite store and a real Mosquitto."""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path

import grpc
import pytest
from securesystemslib.signer import CryptoSigner
from sqlmodel import Session

from edgefleet.agent.device.tls import csr_pem, new_key
from edgefleet.agent.update.artifacts import ArtifactStore
from edgefleet.agent.update.uptane_client import GrpcMetadataFetcher, UptaneVerifier
from edgefleet.controlplane.app.server import RunningControlPlane
from edgefleet.controlplane.build.bundles import BundleOnDisk, build_bundle, open_bundle
from edgefleet.controlplane.cli.client import extend_image_targets, push_requests
from edgefleet.controlplane.fleet.rbac import secret_sha256
from edgefleet.controlplane.store import access
from edgefleet.controlplane.trust.keys import KeyDir, init_keys
from edgefleet.protos.fleet.v1 import device_pb2, device_pb2_grpc, operator_pb2, operator_pb2_grpc
from tests.integration.conftest import EnrolledDevice, admin_token, enroll_device

pytestmark = pytest.mark.integration


async def push(
    stub: operator_pb2_grpc.OperatorServiceStub, bundle_dir: Path, signers: list[CryptoSigner], token: str
) -> operator_pb2.PushBundleResponse:
    """What `fleetctl bundle push` does, over the async channel."""
    current = (await stub.GetImageTargets(operator_pb2.GetImageTargetsRequest())).targets
    image_targets = extend_image_targets(current or None, open_bundle(bundle_dir), signers)

    async def requests() -> AsyncIterator[operator_pb2.PushBundleRequest]:
        for r in push_requests(bundle_dir, image_targets):
            yield r

    # grpc.aio does not apply interceptor metadata to stream-unary calls: pass it directly.
    return await stub.PushBundle(requests(), metadata=(("authorization", f"Bearer {token}"),))


def csr() -> bytes:
    return csr_pem(new_key(), "t")


async def test_enrollment_tokens(
    op: operator_pb2_grpc.OperatorServiceStub,
    channel: grpc.aio.Channel,
    controlplane: RunningControlPlane,
    tmp_path: Path,
) -> None:
    dev = device_pb2_grpc.DeviceServiceStub(channel)
    token = (await op.CreateToken(operator_pb2.CreateTokenRequest())).token
    enrolled = await enroll_device(controlplane, channel, token, tmp_path)
    assert enrolled.id.startswith("dev-")
    assert enrolled.response.mqtt_url == controlplane.mqtt_url
    assert enrolled.response.mqtt_topic_prefix == f"fleet/v1/devices/{enrolled.id}"
    assert enrolled.response.device_endpoint == f":{controlplane.device_port}"
    cert = enrolled.certificate.certificate
    assert cert.subject.rfc4514_string() == f"CN={enrolled.id}"  # named by the CA, not the CSR ("t")

    with pytest.raises(grpc.aio.AioRpcError) as reused:
        await dev.Enroll(device_pb2.EnrollRequest(bootstrap_token=token, csr=csr()))
    assert reused.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "already been used" in (reused.value.details() or "")

    with pytest.raises(grpc.aio.AioRpcError) as forged:
        await dev.Enroll(device_pb2.EnrollRequest(bootstrap_token="not-a-token", csr=csr()))
    assert forged.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "unknown" in (forged.value.details() or "")

    with pytest.raises(grpc.aio.AioRpcError) as empty:
        await dev.Enroll(device_pb2.EnrollRequest(csr=csr()))
    assert empty.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_a_bad_csr_is_refused_and_leaves_the_token_unspent(
    op: operator_pb2_grpc.OperatorServiceStub, channel: grpc.aio.Channel
) -> None:
    dev = device_pb2_grpc.DeviceServiceStub(channel)
    token = (await op.CreateToken(operator_pb2.CreateTokenRequest())).token
    for bad, reason in [
        (b"", "csr is required"),
        (b"-----BEGIN CERTIFICATE REQUEST-----\nAAAA", "csr refused"),
    ]:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await dev.Enroll(device_pb2.EnrollRequest(bootstrap_token=token, csr=bad))
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert reason in (refused.value.details() or "")
    assert (await dev.Enroll(device_pb2.EnrollRequest(bootstrap_token=token, csr=csr()))).device_id


async def test_expired_token_is_refused(channel: grpc.aio.Channel, controlplane: RunningControlPlane) -> None:
    engine = controlplane.engine
    with Session(engine) as s, s.begin():
        access.create_token(
            s, token_sha256=secret_sha256("old"), uses=1, ttl=timedelta(seconds=-1), labels={}
        )
    dev = device_pb2_grpc.DeviceServiceStub(channel)
    with pytest.raises(grpc.aio.AioRpcError) as expired:
        await dev.Enroll(device_pb2.EnrollRequest(bootstrap_token="old", csr=csr()))
    assert expired.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "expired" in (expired.value.details() or "")


async def test_multi_use_token(op: operator_pb2_grpc.OperatorServiceStub, channel: grpc.aio.Channel) -> None:
    dev = device_pb2_grpc.DeviceServiceStub(channel)
    token = (await op.CreateToken(operator_pb2.CreateTokenRequest(uses=2))).token
    ids = {
        (await dev.Enroll(device_pb2.EnrollRequest(bootstrap_token=token, csr=csr()))).device_id for _ in "ab"
    }
    assert len(ids) == 2  # two devices, two keys
    with pytest.raises(grpc.aio.AioRpcError):
        await dev.Enroll(device_pb2.EnrollRequest(bootstrap_token=token, csr=csr()))


async def test_push_deploy_watch_fetch(
    op: operator_pb2_grpc.OperatorServiceStub,
    enrolled: EnrolledDevice,
    controlplane: RunningControlPlane,
    smollm2_bundle: BundleOnDisk,
    keys: KeyDir,
    tmp_path: Path,
) -> None:
    pushed = await push(op, smollm2_bundle.path, keys.release_signers(), admin_token(tmp_path))
    assert (pushed.bundle.name, pushed.bundle.version, pushed.already_present) == ("smollm2", 1, False)
    assert (
        await push(op, smollm2_bundle.path, keys.release_signers(), admin_token(tmp_path))
    ).already_present

    dev = enrolled.stub
    info = next(iter(smollm2_bundle.release.artifacts.values()))

    # Not deployed to this device yet: not fetchable.
    with pytest.raises(grpc.aio.AioRpcError) as hidden:
        async for _ in dev.FetchArtifact(device_pb2.FetchArtifactRequest(sha256=info.sha256)):
            pass
    assert hidden.value.code() == grpc.StatusCode.NOT_FOUND

    stream = dev.WatchDesiredState(device_pb2.WatchDesiredStateRequest())
    deployed = await op.Deploy(operator_pb2.DeployRequest(bundle=pushed.bundle, device_ids=[enrolled.id]))
    assert list(deployed.device_ids) == [enrolled.id]
    desired = await stream.read()
    stream.cancel()
    assert desired.generation == 1

    # What the device verifies: director and image repositories through python-tuf.
    credentials = enrolled.certificate.grpc_credentials(controlplane.ca_pem)
    with grpc.secure_channel(f"127.0.0.1:{controlplane.device_port}", credentials) as sync_channel:
        sync_stub = device_pb2_grpc.DeviceServiceStub(sync_channel)
        verifier = UptaneVerifier(
            tuf_dir=tmp_path / "tuf",
            anchors=keys.trust_anchors(),
            fetcher=GrpcMetadataFetcher(lambda: sync_stub),
            device_id=enrolled.id,
        )
        assignment = await asyncio.to_thread(verifier.refresh)
    assert assignment.generation == 1
    assert [(r.name, r.version) for r in assignment.releases] == [("smollm2", 1)]
    verified = next(iter(assignment.releases[0].artifacts.values()))
    assert (verified.sha256, verified.length) == (info.sha256, info.length)

    # Resumable download: a partial file from an interrupted run is continued, not restarted.
    store = ArtifactStore(tmp_path / "artifacts", tmp_path / "downloads")
    source = smollm2_bundle.artifact_path(info.path).read_bytes()
    store.download_dir.mkdir(parents=True)
    store.part_path(info.sha256).write_bytes(source[: 3 * 1024 * 1024 + 17])
    seen_offsets: list[int] = []
    path = await store.fetch(dev, info, progress=lambda done, _: seen_offsets.append(done))
    assert path.read_bytes() == source
    assert seen_offsets[0] > 3 * 1024 * 1024, "download restarted from zero instead of resuming"

    listed = await op.ListDevices(operator_pb2.ListDevicesRequest())
    row = next(d for d in listed.devices if d.device_id == enrolled.id)
    assert row.desired_bundle.name == "smollm2" and row.desired_generation == 1
    assert [(m.name, m.version) for m in row.desired_models] == [("smollm2", 1)]


async def test_push_refuses_tampered_and_foreign_bundles(
    op: operator_pb2_grpc.OperatorServiceStub,
    channel: grpc.aio.Channel,
    smollm2_bundle: BundleOnDisk,
    tmp_path: Path,
    smollm2_path: Path,
    keys: KeyDir,
) -> None:
    tampered = tmp_path / "tampered"
    shutil.copytree(smollm2_bundle.path, tampered)
    artifact = tampered / "artifacts" / next(iter(smollm2_bundle.release.artifacts))
    data = bytearray(artifact.read_bytes())
    data[1000] ^= 0xFF
    artifact.unlink()
    artifact.write_bytes(bytes(data))
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await push(op, tampered, keys.release_signers(), admin_token(tmp_path))
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "ArtifactHashMismatch" in (refused.value.details() or "")

    foreign = init_keys(tmp_path / "foreign")
    other = build_bundle(
        smollm2_path, name="smollm2", version=7, out=tmp_path / "b7", signers=foreign.release_signers()
    )
    with pytest.raises(grpc.aio.AioRpcError) as untrusted:
        await push(op, other.path, foreign.release_signers(), admin_token(tmp_path))
    assert untrusted.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "UntrustedMetadata" in (untrusted.value.details() or "")

    names = [
        (b.manifest.name, b.manifest.version)
        for b in (await op.ListBundles(operator_pb2.ListBundlesRequest())).bundles
    ]
    assert ("smollm2", 7) not in names


async def test_deploy_unknown_bundle_or_device(
    op: operator_pb2_grpc.OperatorServiceStub, channel: grpc.aio.Channel
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as missing:
        await op.Deploy(operator_pb2.DeployRequest(bundle={"name": "nope", "version": 1}, all_devices=True))
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.aio.AioRpcError) as both:
        await op.Deploy(operator_pb2.DeployRequest(bundle={"name": "nope", "version": 1}))
    assert both.value.code() == grpc.StatusCode.INVALID_ARGUMENT
