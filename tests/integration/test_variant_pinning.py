"""Variant pins over real gRPC: set by an operator, signed into the device's director targets,
verified on the device with python-tuf, and refused to a viewer."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from securesystemslib.signer import CryptoSigner

from edgefleet.agent.device.hardware_profile import HardwareProfile
from edgefleet.agent.update.selection import Pin, PinNotHonoured, select_variant
from edgefleet.agent.update.updater import signed_pin
from edgefleet.agent.update.uptane_client import Assignment, GrpcMetadataFetcher, UptaneVerifier
from edgefleet.controlplane.app.server import RunningControlPlane
from edgefleet.controlplane.build.bundles import BundleOnDisk, open_bundle
from edgefleet.controlplane.cli.client import extend_image_targets, push_requests
from edgefleet.controlplane.trust.keys import KeyDir
from edgefleet.protos.fleet.v1 import common_pb2, device_pb2_grpc, operator_pb2, operator_pb2_grpc
from tests.integration.conftest import (
    EnrolledDevice,
    OperatorToken,
    admin_token,
    enroll_device,
    public_channel,
)
from tests.integration.test_cp_models import stored_director, tiny_bundle

pytestmark = pytest.mark.integration

GGUF = common_pb2.MODEL_FORMAT_GGUF


async def push(
    op: operator_pb2_grpc.OperatorServiceStub, bundle: Path, signers: list[CryptoSigner], token: str
) -> None:
    """What `fleetctl bundle push` does, over the async channel."""
    current = (await op.GetImageTargets(operator_pb2.GetImageTargetsRequest())).targets
    image_targets = extend_image_targets(current or None, open_bundle(bundle), signers)

    async def requests() -> AsyncIterator[operator_pb2.PushBundleRequest]:
        for r in push_requests(bundle, image_targets):
            yield r

    # grpc.aio does not apply interceptor metadata to stream-unary calls: pass it directly.
    await op.PushBundle(requests(), metadata=(("authorization", f"Bearer {token}"),))


async def verified(
    device: EnrolledDevice, controlplane: RunningControlPlane, keys: KeyDir, work: Path
) -> tuple[Assignment, Pin | None, UptaneVerifier]:
    """What the device verifies, as the device does: python-tuf over its mutual-TLS channel,
    trusted state kept per device under ``work``, then the pin from the verified targets."""
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
    assert assignment is not None
    return assignment, signed_pin(assignment), verifier


async def test_operator_pins_reach_the_device_in_signed_director_targets(
    op: operator_pb2_grpc.OperatorServiceStub,
    enrolled: EnrolledDevice,
    controlplane: RunningControlPlane,
    channel: grpc.aio.Channel,
    smollm2_bundle: BundleOnDisk,
    keys: KeyDir,
    tmp_path: Path,
) -> None:
    await push(op, smollm2_bundle.path, keys.release_signers(), admin_token(tmp_path))
    ref = common_pb2.BundleRef(name="smollm2", version=1)
    await op.Deploy(operator_pb2.DeployRequest(bundle=ref, device_ids=[enrolled.id]))
    shipped = smollm2_bundle.release.manifest.variants[0].id
    work = tmp_path / "tuf"
    assignment, pin, verifier = await verified(enrolled, controlplane, keys, work)
    assert (assignment.generation, pin) == (1, None)

    # A device pin: new generation, the pin inside the signed director targets.
    pinned = await op.SetVariantPin(
        operator_pb2.SetVariantPinRequest(device_id=enrolled.id, variant_id=shipped)
    )
    assert (list(pinned.device_ids), pinned.max_generation, pinned.changed) == ([enrolled.id], 2, True)
    again = await op.SetVariantPin(
        operator_pb2.SetVariantPinRequest(device_id=enrolled.id, variant_id=shipped)
    )
    assert (list(again.device_ids), again.changed) == ([], False)
    assignment, pin, _ = await verified(enrolled, controlplane, keys, work)
    assert assignment.generation == 2
    assert pin == Pin(variant_id=shipped, scope="device")
    chosen = select_variant(
        assignment.releases[0], hardware=HardwareProfile(), supported_formats={GGUF}, n_ctx=512, pin=pin
    )
    assert chosen.variant.id == shipped and "pinned to variant" in chosen.reason

    # A pin this device cannot honour is signed all the same; the device refuses it with the reason.
    await op.SetVariantPin(
        operator_pb2.SetVariantPinRequest(device_id=enrolled.id, format=common_pb2.MODEL_FORMAT_MLX)
    )
    assignment, pin, _ = await verified(enrolled, controlplane, keys, work)
    assert pin == Pin(format=common_pb2.MODEL_FORMAT_MLX, scope="device")
    with pytest.raises(PinNotHonoured, match="pinned to runtime mlx"):
        select_variant(
            assignment.releases[0], hardware=HardwareProfile(), supported_formats={GGUF}, n_ctx=512, pin=pin
        )

    # An edited pin in the device's stored copy is not trusted: ngclient refuses the local file
    # and fetches the signed one again.
    stored = verifier.tuf_dir / "director" / "targets.json"
    document = json.loads(stored.read_bytes())
    document["signed"]["edgefleet"]["pin"] = {"format": "MODEL_FORMAT_GGUF"}
    stored.write_text(json.dumps(document))
    _, pin, _ = await verified(enrolled, controlplane, keys, work)
    assert pin == Pin(format=common_pb2.MODEL_FORMAT_MLX, scope="device")

    listed = {d.device_id: d for d in (await op.ListDevices(operator_pb2.ListDevicesRequest())).devices}
    assert listed[enrolled.id].pin == common_pb2.VariantPin(
        format=common_pb2.MODEL_FORMAT_MLX, scope="device"
    )

    cleared = await op.SetVariantPin(operator_pb2.SetVariantPinRequest(device_id=enrolled.id, clear=True))
    assert cleared.max_generation == 4
    assignment, pin, _ = await verified(enrolled, controlplane, keys, work)
    assert (assignment.generation, pin) == (4, None)

    actions = [
        e.action
        for e in (await op.ListAudit(operator_pb2.ListAuditRequest(target=f"device:{enrolled.id}"))).entries
    ]
    assert actions.count("pin.set") == 3 and actions.count("pin.clear") == 1


async def test_group_pins_follow_labels_and_wait_for_a_deployment(
    op: operator_pb2_grpc.OperatorServiceStub,
    controlplane: RunningControlPlane,
    channel: grpc.aio.Channel,
    smollm2_bundle: BundleOnDisk,
    keys: KeyDir,
    tmp_path: Path,
) -> None:
    token = (await op.CreateToken(operator_pb2.CreateTokenRequest(labels={"hw": "jetson"}))).token
    jetson = await enroll_device(controlplane, channel, token, tmp_path)
    other_token = (await op.CreateToken(operator_pb2.CreateTokenRequest(labels={"hw": "pi"}))).token
    pi = await enroll_device(controlplane, channel, other_token, tmp_path)
    # No release assigned yet: the pin is kept for the next deployment, nothing is re-signed.
    early = await op.SetVariantPin(operator_pb2.SetVariantPinRequest(selector={"hw": "jetson"}, format=GGUF))
    assert (early.changed, list(early.device_ids)) == (True, [])

    await push(op, smollm2_bundle.path, keys.release_signers(), admin_token(tmp_path))
    ref = common_pb2.BundleRef(name="smollm2", version=1)
    await op.Deploy(operator_pb2.DeployRequest(bundle=ref, device_ids=[jetson.id, pi.id]))
    _, jetson_pin, _ = await verified(jetson, controlplane, keys, tmp_path / "tuf")
    _, pi_pin, _ = await verified(pi, controlplane, keys, tmp_path / "tuf")
    assert jetson_pin == Pin(format=GGUF, scope="hw=jetson")
    assert pi_pin is None

    # A device's own pin outranks its group's.
    shipped = smollm2_bundle.release.manifest.variants[0].id
    await op.SetVariantPin(operator_pb2.SetVariantPinRequest(device_id=jetson.id, variant_id=shipped))
    _, jetson_pin, _ = await verified(jetson, controlplane, keys, tmp_path / "tuf")
    assert jetson_pin == Pin(variant_id=shipped, scope="device")
    unpinned = await op.SetVariantPin(
        operator_pb2.SetVariantPinRequest(selector={"hw": "jetson"}, clear=True)
    )
    assert (unpinned.changed, list(unpinned.device_ids)) == (True, [])  # the device pin still rules
    for device in (jetson, pi):
        await device.channel.close()


async def test_a_pin_re_signs_every_model_the_device_holds(
    op: operator_pb2_grpc.OperatorServiceStub,
    enrolled: EnrolledDevice,
    controlplane: RunningControlPlane,
    smollm2_bundle: BundleOnDisk,
    keys: KeyDir,
    tmp_path: Path,
) -> None:
    await push(op, smollm2_bundle.path, keys.release_signers(), admin_token(tmp_path))
    tiny = tiny_bundle(tmp_path, keys, "alpha", 1)
    await push(op, tiny.path, keys.release_signers(), admin_token(tmp_path))
    for name in ("smollm2", "alpha"):
        ref = common_pb2.BundleRef(name=name, version=1)
        await op.Deploy(operator_pb2.DeployRequest(bundle=ref, device_ids=[enrolled.id]))

    pinned = await op.SetVariantPin(operator_pb2.SetVariantPinRequest(device_id=enrolled.id, format=GGUF))
    assert (list(pinned.device_ids), pinned.max_generation) == ([enrolled.id], 3)
    signed = stored_director(controlplane, enrolled.id)
    assert (signed.generation, signed.releases) == (3, (("alpha", 1), ("smollm2", 1)))
    assert signed.pin == common_pb2.VariantPin(format=GGUF, scope="device")
    assignment, pin, _ = await verified(enrolled, controlplane, keys, tmp_path / "tuf")
    assert [r.name for r in assignment.releases] == ["alpha", "smollm2"]
    assert pin == Pin(format=GGUF, scope="device")

    await op.SetVariantPin(operator_pb2.SetVariantPinRequest(device_id=enrolled.id, clear=True))
    signed = stored_director(controlplane, enrolled.id)
    assert (signed.generation, signed.releases, signed.pin) == (4, (("alpha", 1), ("smollm2", 1)), None)


async def test_a_viewer_cannot_pin_and_bad_requests_are_refused(
    op: operator_pb2_grpc.OperatorServiceStub, controlplane: RunningControlPlane, enrolled: EnrolledDevice
) -> None:
    viewer_token = (
        await op.CreateOperator(operator_pb2.CreateOperatorRequest(name="v", role="viewer"))
    ).token
    async with public_channel(controlplane, interceptors=[OperatorToken(viewer_token)]) as ch:
        viewer = operator_pb2_grpc.OperatorServiceStub(ch)
        with pytest.raises(grpc.aio.AioRpcError) as denied:
            await viewer.SetVariantPin(operator_pb2.SetVariantPinRequest(device_id=enrolled.id, format=GGUF))
        assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED
    for request, code in [
        (operator_pb2.SetVariantPinRequest(device_id=enrolled.id), grpc.StatusCode.INVALID_ARGUMENT),
        (operator_pb2.SetVariantPinRequest(variant_id="x"), grpc.StatusCode.INVALID_ARGUMENT),
        (
            operator_pb2.SetVariantPinRequest(device_id=enrolled.id, variant_id="x", format=GGUF),
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
        (operator_pb2.SetVariantPinRequest(device_id="dev-nope", format=GGUF), grpc.StatusCode.NOT_FOUND),
    ]:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await op.SetVariantPin(request)
        assert refused.value.code() == code, request
    entries = (await op.ListAudit(operator_pb2.ListAuditRequest(action="pin.set"))).entries
    assert {e.outcome for e in entries} == {"refused"}
