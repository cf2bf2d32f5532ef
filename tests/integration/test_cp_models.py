"""Several models per device, over real gRPC and a real SQLite store: deploy adds a model or
replaces the release of its name, undeploy removes one, and every change is signed into the
device's director targets, which are read back and checked here as a device would."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterable
from pathlib import Path

import grpc
import pytest
from click.testing import Result
from securesystemslib.signer import CryptoSigner
from sqlmodel import Session, col, select
from tuf.api.metadata import Metadata, Root, Targets
from typer.testing import CliRunner

from edgefleet.agent.update.uptane_client import Assignment, GrpcMetadataFetcher, UptaneVerifier
from edgefleet.controlplane.app.server import RunningControlPlane
from edgefleet.controlplane.build.bundles import BundleOnDisk, VariantFile, open_bundle, write_bundle
from edgefleet.controlplane.cli.client import extend_image_targets, push_requests
from edgefleet.controlplane.cli.main import app as fleetctl
from edgefleet.controlplane.store.models import TufMetadata
from edgefleet.controlplane.trust.keys import KeyDir
from edgefleet.protos.fleet import uptane
from edgefleet.protos.fleet.uptane import DIRECTOR
from edgefleet.protos.fleet.v1 import (
    bundle_pb2,
    common_pb2,
    device_pb2,
    device_pb2_grpc,
    operator_pb2,
    operator_pb2_grpc,
)
from tests.integration.conftest import (
    EnrolledDevice,
    OperatorToken,
    admin_token,
    enroll_device,
    public_channel,
)

pytestmark = pytest.mark.integration

Release = tuple[str, int]


# -- helpers (also used by the other control-plane test files) --------------------------------


def tiny_bundle(work: Path, keys: KeyDir, name: str, version: int) -> BundleOnDisk:
    """A signed one-variant bundle of a few bytes: the control plane never looks inside."""
    payload = work / f"{name}-{version}.bin"
    payload.write_bytes(f"weights of {name}@{version}".encode() * 64)
    variant = bundle_pb2.Variant(
        id="gguf-q4_0", format=common_pb2.MODEL_FORMAT_GGUF, quantization="Q4_0", artifact="model.q4_0.gguf"
    )
    return write_bundle(
        [VariantFile(payload, variant)],
        name=name,
        version=version,
        out=work / f"{name}-{version}",
        signers=keys.release_signers(),
    )


async def push(
    op: operator_pb2_grpc.OperatorServiceStub, bundle: Path, signers: list[CryptoSigner], token: str
) -> common_pb2.BundleRef:
    """What `fleetctl bundle push` does, over the async channel."""
    current = (await op.GetImageTargets(operator_pb2.GetImageTargetsRequest())).targets
    image_targets = extend_image_targets(current or None, open_bundle(bundle), signers)

    async def requests() -> AsyncIterator[operator_pb2.PushBundleRequest]:
        for r in push_requests(bundle, image_targets):
            yield r

    # grpc.aio does not apply interceptor metadata to stream-unary calls: pass it directly.
    pushed = await op.PushBundle(requests(), metadata=(("authorization", f"Bearer {token}"),))
    return pushed.bundle


def stored_director(controlplane: RunningControlPlane, device_id: str) -> uptane.DirectorAssignment:
    """The device's latest director targets as stored, checked against the director root's
    targets keys, then parsed as the agent parses them."""
    with Session(controlplane.engine) as s:
        rows = s.exec(
            select(TufMetadata)
            .where(TufMetadata.repository == DIRECTOR, col(TufMetadata.role).in_(["targets", "root"]))
            .where(col(TufMetadata.device_id).in_([device_id, ""]))
            .order_by(col(TufMetadata.version).desc())
        ).all()
    root = next(Metadata[Root].from_bytes(r.data) for r in rows if r.role == "root")
    targets = next(Metadata[Targets].from_bytes(r.data) for r in rows if r.role == "targets")
    root.signed.verify_delegate("targets", targets.signed_bytes, targets.signatures)
    assignment = uptane.parse_director_targets(targets.signed)
    assert assignment.device_id == device_id
    return assignment


def director_targets_version(controlplane: RunningControlPlane, device_id: str) -> int:
    with Session(controlplane.engine) as s:
        versions = s.exec(
            select(TufMetadata.version).where(
                TufMetadata.repository == DIRECTOR,
                TufMetadata.device_id == device_id,
                TufMetadata.role == "targets",
            )
        ).all()
    return max(versions, default=0)


async def device_verified(
    device: EnrolledDevice, controlplane: RunningControlPlane, keys: KeyDir, work: Path
) -> tuple[Assignment, UptaneVerifier]:
    """What the device verifies, as the agent does: both repositories through python-tuf over
    its mutual-TLS channel from its provisioned roots, trusted state kept under ``work``."""
    credentials = device.certificate.grpc_credentials(controlplane.ca_pem)
    with grpc.secure_channel(f"127.0.0.1:{controlplane.device_port}", credentials) as sync_channel:
        stub = device_pb2_grpc.DeviceServiceStub(sync_channel)
        verifier = UptaneVerifier(
            tuf_dir=work / device.id,
            anchors=keys.trust_anchors(),
            fetcher=GrpcMetadataFetcher(lambda: stub),
            device_id=device.id,
        )
        assignment = await asyncio.to_thread(verifier.refresh)
    return assignment, verifier


def verified_releases(assignment: Assignment) -> list[Release]:
    return [(r.name, r.version) for r in assignment.releases]


def release_paths(bundle: BundleOnDisk) -> set[str]:
    """The image (and director) target paths of a bundle's artifacts."""
    r = bundle.release
    return {uptane.image_target_path(r.name, r.version, artifact) for artifact in r.artifacts}


async def listed(op: operator_pb2_grpc.OperatorServiceStub, device_id: str) -> common_pb2.DeviceSummary:
    devices = (await op.ListDevices(operator_pb2.ListDevicesRequest())).devices
    return next(d for d in devices if d.device_id == device_id)


def refs(summary_refs: Iterable[common_pb2.BundleRef]) -> list[Release]:
    return [(r.name, r.version) for r in summary_refs]


# -- fixtures ------------------------------------------------------------------------------


@pytest.fixture
async def bundles(
    op: operator_pb2_grpc.OperatorServiceStub, keys: KeyDir, tmp_path: Path
) -> dict[Release, BundleOnDisk]:
    """alpha@1, alpha@2 and beta@1, pushed."""
    made = {}
    for name, version in [("alpha", 1), ("alpha", 2), ("beta", 1)]:
        bundle = tiny_bundle(tmp_path, keys, name, version)
        await push(op, bundle.path, keys.release_signers(), admin_token(tmp_path))
        made[(name, version)] = bundle
    return made


async def deploy(op: operator_pb2_grpc.OperatorServiceStub, name: str, version: int, *ids: str) -> int:
    response = await op.Deploy(
        operator_pb2.DeployRequest(bundle=common_pb2.BundleRef(name=name, version=version), device_ids=ids)
    )
    assert sorted(response.device_ids) == sorted(ids)
    return response.max_generation


async def undeploy(
    op: operator_pb2_grpc.OperatorServiceStub, name: str, *ids: str
) -> operator_pb2.UndeployResponse:
    request = operator_pb2.UndeployRequest(name=name, device_ids=ids, all_devices=not ids)
    return await op.Undeploy(request)


# -- deploy --------------------------------------------------------------------------------


async def test_two_bundles_deployed_to_a_device_are_both_in_its_signed_targets(
    op: operator_pb2_grpc.OperatorServiceStub,
    enrolled: EnrolledDevice,
    controlplane: RunningControlPlane,
    bundles: dict[Release, BundleOnDisk],
    keys: KeyDir,
    tmp_path: Path,
) -> None:
    assert await deploy(op, "alpha", 1, enrolled.id) == 1
    assert await deploy(op, "beta", 1, enrolled.id) == 2

    assignment = stored_director(controlplane, enrolled.id)
    assert (assignment.generation, assignment.releases) == (2, (("alpha", 1), ("beta", 1)))
    assert set(assignment.targets) == release_paths(bundles[("alpha", 1)]) | release_paths(
        bundles[("beta", 1)]
    )
    verified, _ = await device_verified(enrolled, controlplane, keys, tmp_path / "tuf")
    assert (verified.generation, verified_releases(verified)) == (2, [("alpha", 1), ("beta", 1)])
    for release in verified.releases:
        assert set(release.artifacts) == release_paths(bundles[(release.name, release.version)])

    summary = await listed(op, enrolled.id)
    assert refs(summary.desired_models) == [("alpha", 1), ("beta", 1)]
    assert (summary.desired_bundle.name, summary.desired_bundle.version) == ("beta", 1)  # the latest
    assert summary.desired_generation == 2


async def test_deploying_a_new_version_replaces_that_name_only(
    op: operator_pb2_grpc.OperatorServiceStub,
    enrolled: EnrolledDevice,
    controlplane: RunningControlPlane,
    bundles: dict[Release, BundleOnDisk],
) -> None:
    await deploy(op, "alpha", 1, enrolled.id)
    await deploy(op, "beta", 1, enrolled.id)
    await deploy(op, "alpha", 2, enrolled.id)

    assignment = stored_director(controlplane, enrolled.id)
    assert (assignment.generation, assignment.releases) == (3, (("alpha", 2), ("beta", 1)))
    assert set(assignment.targets) == release_paths(bundles[("alpha", 2)]) | release_paths(
        bundles[("beta", 1)]
    )
    assert not set(assignment.targets) & release_paths(bundles[("alpha", 1)])

    # A deliberate rollback is a deployment of the older release: it replaces v2 the same way.
    await deploy(op, "alpha", 1, enrolled.id)
    assert stored_director(controlplane, enrolled.id).releases == (("alpha", 1), ("beta", 1))
    assert refs((await listed(op, enrolled.id)).desired_models) == [("alpha", 1), ("beta", 1)]


# -- undeploy ------------------------------------------------------------------------------


async def test_undeploy_removes_one_model_and_keeps_the_other(
    op: operator_pb2_grpc.OperatorServiceStub,
    enrolled: EnrolledDevice,
    controlplane: RunningControlPlane,
    bundles: dict[Release, BundleOnDisk],
) -> None:
    await deploy(op, "beta", 1, enrolled.id)
    await deploy(op, "alpha", 2, enrolled.id)  # the most recent: desired_bundle

    removed = await undeploy(op, "alpha", enrolled.id)
    assert (list(removed.device_ids), removed.max_generation) == ([enrolled.id], 3)

    assignment = stored_director(controlplane, enrolled.id)
    assert (assignment.generation, assignment.releases) == (3, (("beta", 1),))
    assert set(assignment.targets) == release_paths(bundles[("beta", 1)])
    summary = await listed(op, enrolled.id)
    assert refs(summary.desired_models) == [("beta", 1)]
    assert (summary.desired_bundle.name, summary.desired_bundle.version) == ("beta", 1)

    entry = (await op.ListAudit(operator_pb2.ListAuditRequest(action="undeploy"))).entries[0]
    assert (entry.target, entry.outcome) == ("alpha", "ok")
    assert json.loads(entry.detail_json) == {"devices": {enrolled.id: 3}}
    assert (await op.VerifyAudit(operator_pb2.VerifyAuditRequest())).ok


async def test_undeploying_a_model_a_device_lacks_leaves_that_device_alone(
    op: operator_pb2_grpc.OperatorServiceStub,
    controlplane: RunningControlPlane,
    channel: grpc.aio.Channel,
    bundles: dict[Release, BundleOnDisk],
    tmp_path: Path,
) -> None:
    token = (await op.CreateToken(operator_pb2.CreateTokenRequest(uses=2))).token
    both = await enroll_device(controlplane, channel, token, tmp_path)
    beta_only = await enroll_device(controlplane, channel, token, tmp_path)
    await deploy(op, "alpha", 1, both.id)
    await deploy(op, "beta", 1, both.id, beta_only.id)
    untouched_version = director_targets_version(controlplane, beta_only.id)

    named = await undeploy(op, "alpha", beta_only.id)
    assert (list(named.device_ids), named.max_generation) == ([], 0)
    everywhere = await undeploy(op, "alpha")
    assert list(everywhere.device_ids) == [both.id]

    assert director_targets_version(controlplane, beta_only.id) == untouched_version
    assert (await listed(op, beta_only.id)).desired_generation == 1
    assert stored_director(controlplane, beta_only.id).releases == (("beta", 1),)
    assert stored_director(controlplane, both.id).releases == (("beta", 1),)
    audited = (await op.ListAudit(operator_pb2.ListAuditRequest(action="undeploy"))).entries
    assert [json.loads(e.detail_json)["devices"] for e in audited] == [{both.id: 3}, {}]
    for device in (both, beta_only):
        await device.channel.close()


async def test_undeploying_the_last_model_signs_no_targets_and_still_nudges(
    op: operator_pb2_grpc.OperatorServiceStub,
    enrolled: EnrolledDevice,
    controlplane: RunningControlPlane,
    bundles: dict[Release, BundleOnDisk],
    keys: KeyDir,
    tmp_path: Path,
) -> None:
    await deploy(op, "alpha", 1, enrolled.id)
    stream = enrolled.stub.WatchDesiredState(device_pb2.WatchDesiredStateRequest())
    first = await stream.read()
    assert (first.generation, first.bundle.name) == (1, "alpha")

    removed = await undeploy(op, "alpha", enrolled.id)
    assert list(removed.device_ids) == [enrolled.id]
    nudge = await asyncio.wait_for(stream.read(), timeout=10)
    stream.cancel()
    assert nudge.generation == 2 and not nudge.HasField("bundle")

    assignment = stored_director(controlplane, enrolled.id)
    assert (assignment.generation, assignment.releases, dict(assignment.targets)) == (2, (), {})
    verified, _ = await device_verified(enrolled, controlplane, keys, tmp_path / "tuf")
    assert (verified.generation, verified.releases) == (2, ())

    # A device that connects later still learns of the generation at once.
    again = enrolled.stub.WatchDesiredState(device_pb2.WatchDesiredStateRequest())
    late = await asyncio.wait_for(again.read(), timeout=10)
    again.cancel()
    assert late.generation == 2 and not late.HasField("bundle")

    summary = await listed(op, enrolled.id)
    assert (list(summary.desired_models), summary.HasField("desired_bundle")) == ([], False)


async def test_undeploy_refuses_bad_requests_and_unknown_devices(
    op: operator_pb2_grpc.OperatorServiceStub, enrolled: EnrolledDevice
) -> None:
    for request, code in [
        (operator_pb2.UndeployRequest(all_devices=True), grpc.StatusCode.INVALID_ARGUMENT),
        (operator_pb2.UndeployRequest(name="alpha"), grpc.StatusCode.INVALID_ARGUMENT),
        (
            operator_pb2.UndeployRequest(name="alpha", all_devices=True, device_ids=[enrolled.id]),
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
        (
            operator_pb2.UndeployRequest(name="alpha", device_ids=[enrolled.id, "dev-nope"]),
            grpc.StatusCode.NOT_FOUND,
        ),
    ]:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await op.Undeploy(request)
        assert refused.value.code() == code, request
    assert "dev-nope" in (refused.value.details() or "")
    entries = (await op.ListAudit(operator_pb2.ListAuditRequest(action="undeploy"))).entries
    assert [(e.target, e.outcome) for e in entries] == [("alpha", "refused")]


# -- what devices report -------------------------------------------------------------------


async def test_reported_models_are_listed_next_to_the_assigned_ones(
    op: operator_pb2_grpc.OperatorServiceStub,
    enrolled: EnrolledDevice,
    bundles: dict[Release, BundleOnDisk],
) -> None:
    await deploy(op, "alpha", 1, enrolled.id)
    await deploy(op, "beta", 1, enrolled.id)
    installed = [
        common_pb2.InstalledModel(
            bundle=common_pb2.BundleRef(name="alpha", version=1), variant="gguf-q4_0", loaded=True
        ),
        common_pb2.InstalledModel(bundle=common_pb2.BundleRef(name="beta", version=1), variant="gguf-q4_0"),
    ]
    await enrolled.stub.ReportStatus(
        device_pb2.StatusReport(
            state=common_pb2.DEVICE_STATE_ACTIVE,
            generation=2,
            active_bundle=common_pb2.BundleRef(name="beta", version=1),
            variant="gguf-q4_0",
            models=installed,
        )
    )
    summary = await listed(op, enrolled.id)
    assert list(summary.models) == installed
    assert (summary.active_bundle.name, summary.variant, summary.applied_generation) == (
        "beta",
        "gguf-q4_0",
        2,
    )

    # Its last model undeployed, the device holds nothing and says so: that generation is applied.
    await undeploy(op, "alpha", enrolled.id)
    await undeploy(op, "beta", enrolled.id)
    await enrolled.stub.ReportStatus(
        device_pb2.StatusReport(state=common_pb2.DEVICE_STATE_IDLE, generation=4)
    )
    summary = await listed(op, enrolled.id)
    assert (list(summary.models), summary.applied_generation, summary.desired_generation) == ([], 4, 4)


# -- fleetctl ------------------------------------------------------------------------------


async def test_fleetctl_undeploy_by_selector(
    op: operator_pb2_grpc.OperatorServiceStub,
    controlplane: RunningControlPlane,
    channel: grpc.aio.Channel,
    bundles: dict[Release, BundleOnDisk],
    tmp_path: Path,
) -> None:
    jetson_token = (await op.CreateToken(operator_pb2.CreateTokenRequest(labels={"hw": "jetson"}))).token
    jetson = await enroll_device(controlplane, channel, jetson_token, tmp_path)
    pi_token = (await op.CreateToken(operator_pb2.CreateTokenRequest(labels={"hw": "pi"}))).token
    pi = await enroll_device(controlplane, channel, pi_token, tmp_path)
    await op.Deploy(
        operator_pb2.DeployRequest(bundle=common_pb2.BundleRef(name="alpha", version=1), all_devices=True)
    )
    ca = tmp_path / "ca.pem"
    ca.write_bytes(controlplane.ca_pem)
    env = {"EDGEFLEET_TLS_CA": str(ca), "EDGEFLEET_OPERATOR_TOKEN": admin_token(tmp_path)}
    address = ["--controlplane", f"127.0.0.1:{controlplane.port}"]

    def fleetctl_run(*args: str) -> Result:
        return CliRunner().invoke(fleetctl, [*args, *address], env=env)

    result = await asyncio.to_thread(fleetctl_run, "undeploy", "alpha", "--selector", "hw=jetson")
    assert result.exit_code == 0, result.output
    assert result.stdout.split() == [jetson.id]
    assert "alpha removed from 1 device(s)" in result.output
    assert stored_director(controlplane, jetson.id).releases == ()
    assert stored_director(controlplane, pi.id).releases == (("alpha", 1),)

    nobody = await asyncio.to_thread(fleetctl_run, "undeploy", "alpha", "--selector", "hw=tpu,site=x")
    assert nobody.exit_code == 1 and "no device has the labels hw=tpu,site=x" in nobody.output
    for device in (jetson, pi):
        await device.channel.close()


async def test_a_viewer_cannot_undeploy(
    op: operator_pb2_grpc.OperatorServiceStub,
    controlplane: RunningControlPlane,
    enrolled: EnrolledDevice,
    bundles: dict[Release, BundleOnDisk],
) -> None:
    await deploy(op, "alpha", 1, enrolled.id)
    viewer_token = (
        await op.CreateOperator(operator_pb2.CreateOperatorRequest(name="v", role="viewer"))
    ).token
    async with public_channel(controlplane, interceptors=[OperatorToken(viewer_token)]) as ch:
        viewer = operator_pb2_grpc.OperatorServiceStub(ch)
        with pytest.raises(grpc.aio.AioRpcError) as denied:
            await viewer.Undeploy(operator_pb2.UndeployRequest(name="alpha", all_devices=True))
    assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert stored_director(controlplane, enrolled.id).releases == (("alpha", 1),)
