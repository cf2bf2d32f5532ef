"""The rollout and label RPCs' contract over real gRPC: roles, audit, and each refusal with its
status code and a message that says what to do."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from edgefleet.controlplane.app.server import RunningControlPlane
from edgefleet.controlplane.trust.keys import KeyDir
from edgefleet.protos.fleet.v1 import common_pb2, operator_pb2, operator_pb2_grpc
from tests.integration.conftest import OperatorToken, admin_token, public_channel
from tests.integration.test_cp_models import stored_director
from tests.integration.test_rollout_sim import SimFleet, eventually, push_release, rollout_settings, start

pytestmark = pytest.mark.integration

S = operator_pb2


@pytest.fixture
async def controlplane(tmp_path: Path, keys: KeyDir, mosquitto: str) -> AsyncIterator[RunningControlPlane]:
    running = await start(rollout_settings(tmp_path, keys, mosquitto))
    yield running
    await running.stop(grace=0)


@pytest.fixture
async def fleet(controlplane: RunningControlPlane, tmp_path: Path) -> AsyncIterator[SimFleet]:
    sim = SimFleet(controlplane, tmp_path)
    yield sim
    await sim.close()


async def refusal(call: object) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await call  # type: ignore[misc]
    return raised.value.code(), raised.value.details() or ""


async def viewer_stub(
    op: operator_pb2_grpc.OperatorServiceStub, controlplane: RunningControlPlane
) -> tuple[grpc.aio.Channel, operator_pb2_grpc.OperatorServiceStub]:
    token = (await op.CreateOperator(S.CreateOperatorRequest(name="watcher", role="viewer"))).token
    channel = public_channel(controlplane, interceptors=[OperatorToken(token)])
    return channel, operator_pb2_grpc.OperatorServiceStub(channel)


async def test_labels_are_set_removed_audited_and_checked(
    op: operator_pb2_grpc.OperatorServiceStub,
    channel: grpc.aio.Channel,
    fleet: SimFleet,
    controlplane: RunningControlPlane,
) -> None:
    [device] = await fleet.enroll(op, channel, 1, {"hw": "cpu", "site": "a"})
    labelled = await op.SetDeviceLabels(
        S.SetDeviceLabelsRequest(device_id=device.id, set={"region": "eu", "hw": "jetson"}, remove=["site"])
    )
    assert dict(labelled.labels) == {"hw": "jetson", "region": "eu"}
    [summary] = (await op.ListDevices(S.ListDevicesRequest())).devices
    assert dict(summary.labels) == {"hw": "jetson", "region": "eu"}
    [entry] = (await op.ListAudit(S.ListAuditRequest(action="device.labels"))).entries
    assert (entry.target, entry.outcome) == (device.id, "ok")

    code, message = await refusal(
        op.SetDeviceLabels(S.SetDeviceLabelsRequest(device_id=device.id, set={"a,b": "c"}))
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "KEY=VALUE" in message
    code, _ = await refusal(
        op.SetDeviceLabels(S.SetDeviceLabelsRequest(device_id="dev-nope", set={"a": "b"}))
    )
    assert code == grpc.StatusCode.NOT_FOUND
    viewer_channel, viewer = await viewer_stub(op, controlplane)
    async with viewer_channel:
        code, _ = await refusal(
            viewer.SetDeviceLabels(S.SetDeviceLabelsRequest(device_id=device.id, set={"a": "b"}))
        )
    assert code == grpc.StatusCode.PERMISSION_DENIED


async def test_a_label_that_brings_a_group_pin_re_signs_the_device(
    op: operator_pb2_grpc.OperatorServiceStub,
    channel: grpc.aio.Channel,
    fleet: SimFleet,
    controlplane: RunningControlPlane,
    keys: KeyDir,
    tmp_path: Path,
) -> None:
    await push_release(op, keys, tmp_path, admin_token(tmp_path), "m", 1)
    [device] = await fleet.enroll(op, channel, 1, {})
    await op.Deploy(S.DeployRequest(bundle=common_pb2.BundleRef(name="m", version=1), device_ids=[device.id]))
    await op.SetVariantPin(S.SetVariantPinRequest(selector={"hw": "jetson"}, variant_id="gguf-q4_0"))
    assert stored_director(controlplane, device.id).pin is None
    await op.SetDeviceLabels(S.SetDeviceLabelsRequest(device_id=device.id, set={"hw": "jetson"}))
    signed = stored_director(controlplane, device.id)
    assert signed.generation == 2 and signed.pin is not None and signed.pin.scope == "hw=jetson"


async def test_rollout_requests_are_checked(
    op: operator_pb2_grpc.OperatorServiceStub,
    channel: grpc.aio.Channel,
    fleet: SimFleet,
    controlplane: RunningControlPlane,
    keys: KeyDir,
    tmp_path: Path,
) -> None:
    await push_release(op, keys, tmp_path, admin_token(tmp_path), "m", 1)
    await fleet.enroll(op, channel, 2, {"region": "eu"})
    m1 = common_pb2.BundleRef(name="m", version=1)

    async def create(**kwargs: object) -> tuple[grpc.StatusCode, str]:
        return await refusal(op.CreateRollout(S.CreateRolloutRequest(**kwargs)))  # type: ignore[arg-type]

    assert await create(name="x") == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "give the change: a bundle (NAME@VERSION) or a device config",
    )
    code, message = await create(name="bad name!", bundle=m1)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "letters, digits" in message
    code, message = await create(name="x", bundle=m1, waves=[S.WaveSpec(percent=50), S.WaveSpec(percent=10)])
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "must grow" in message
    code, message = await create(name="x", bundle=m1, gates=S.HealthGates(max_error_rate=2))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "fraction" in message
    code, message = await create(name="x", config=common_pb2.DeviceConfig(n_threads=0))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and message.startswith("device config refused: n_threads")
    code, message = await create(name="x", config=common_pb2.DeviceConfig(mirrors=["ftp://mirror.local"]))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "refused: mirrors[0]: must be an http" in message
    code, message = await create(name="x", bundle=common_pb2.BundleRef(name="m", version=9))
    assert code == grpc.StatusCode.NOT_FOUND and "m@9" in message
    code, message = await create(name="x", bundle=m1, selector={"region": "us"})
    assert (
        code == grpc.StatusCode.FAILED_PRECONDITION
        and "no enrolled device matches the selector region=us" in message
    )

    first = await op.CreateRollout(
        S.CreateRolloutRequest(name="eu", bundle=m1, selector={"region": "eu"}, soak_seconds=600)
    )
    assert (first.state, first.created_by) == (S.ROLLOUT_STATE_RUNNING, "operator:admin")
    code, message = await create(name="eu", bundle=m1)
    assert code == grpc.StatusCode.ALREADY_EXISTS
    code, message = await create(name="again", bundle=m1)  # every device overlaps region=eu
    assert (
        code == grpc.StatusCode.FAILED_PRECONDITION and "rollout eu (running) also changes model m" in message
    )
    # A config rollout does not touch models: it may run alongside.
    await op.CreateRollout(S.CreateRolloutRequest(name="cfg", config=common_pb2.DeviceConfig(n_threads=2)))

    code, message = await refusal(op.GetRollout(S.GetRolloutRequest(name="nope")))
    assert (code, message) == (grpc.StatusCode.NOT_FOUND, "no rollout 'nope'")
    refused = (await op.ListAudit(S.ListAuditRequest(action="rollout.create"))).entries
    assert {e.outcome for e in refused} == {"ok", "refused"}


async def test_viewers_read_rollouts_and_only_operators_change_them(
    op: operator_pb2_grpc.OperatorServiceStub,
    channel: grpc.aio.Channel,
    fleet: SimFleet,
    controlplane: RunningControlPlane,
    keys: KeyDir,
    tmp_path: Path,
) -> None:
    await push_release(op, keys, tmp_path, admin_token(tmp_path), "m", 1)
    await fleet.enroll(op, channel, 1, {})
    m1 = common_pb2.BundleRef(name="m", version=1)
    created = await op.CreateRollout(S.CreateRolloutRequest(name="r", bundle=m1))
    viewer_channel, viewer = await viewer_stub(op, controlplane)
    async with viewer_channel:
        by_id = await viewer.GetRollout(S.GetRolloutRequest(id=created.id))
        assert by_id.name == "r" and len(by_id.devices) in (0, 1)
        assert [r.name for r in (await viewer.ListRollouts(S.ListRolloutsRequest())).rollouts] == ["r"]
        code, _ = await refusal(viewer.CreateRollout(S.CreateRolloutRequest(name="v", bundle=m1)))
        assert code == grpc.StatusCode.PERMISSION_DENIED
        code, _ = await refusal(
            viewer.ControlRollout(
                S.ControlRolloutRequest(rollout=S.GetRolloutRequest(name="r"), action=S.ROLLOUT_ACTION_PAUSE)
            )
        )
        assert code == grpc.StatusCode.PERMISSION_DENIED

    async def one_device() -> bool:
        return len((await op.GetRollout(S.GetRolloutRequest(name="r"))).devices) == 1

    await eventually(one_device)
