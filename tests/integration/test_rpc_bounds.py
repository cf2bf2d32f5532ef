"""What devices and operators send is bounded where it enters, every listing is paged so no
reply passes the message limit whatever is stored, and errors do not echo unbounded input.
Real sockets, the real control plane, a real SQLite store."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
from sqlmodel import Session

from edgefleet.agent.device.tls import csr_pem, new_key
from edgefleet.controlplane.api.limits import MAX_ERROR_CHARS
from edgefleet.controlplane.app.server import MAX_MESSAGE_BYTES, RunningControlPlane
from edgefleet.controlplane.store.models import Device, TelemetryRecord, utcnow
from edgefleet.protos.fleet.v1 import device_pb2, device_pb2_grpc, operator_pb2, operator_pb2_grpc
from tests.integration.conftest import enroll_device

pytestmark = pytest.mark.integration

HUGE_LABELS = {f"k{i}": "v" * 240_000 for i in range(32)}  # what once broke `devices list`


async def refusal(call: object) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await call  # type: ignore[misc]
    return refused.value.code(), refused.value.details() or ""


async def test_labels_are_bounded_at_every_entry(
    op: operator_pb2_grpc.OperatorServiceStub,
    channel: grpc.aio.Channel,
    tmp_path: Path,
    controlplane: RunningControlPlane,
) -> None:
    code, details = await refusal(op.CreateToken(operator_pb2.CreateTokenRequest(labels=HUGE_LABELS)))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and len(details) <= MAX_ERROR_CHARS
    for labels in ({"hw": "x" * 129}, {"bad key": "v"}, {f"k{i}": "v" for i in range(33)}, {"hw": "a b"}):
        code, _ = await refusal(op.CreateToken(operator_pb2.CreateTokenRequest(labels=labels)))
        assert code == grpc.StatusCode.INVALID_ARGUMENT, labels

    dev = device_pb2_grpc.DeviceServiceStub(channel)
    token = (await op.CreateToken(operator_pb2.CreateTokenRequest(uses=2, labels={"hw": "cpu"}))).token
    enroll = device_pb2.EnrollRequest(bootstrap_token=token, csr=csr_pem(new_key(), "t"), labels={"a b": "c"})
    assert (await refusal(dev.Enroll(enroll)))[0] == grpc.StatusCode.INVALID_ARGUMENT
    device = await enroll_device(controlplane, channel, token, tmp_path)  # the token was not spent

    for change in ({"site": "y" * 129}, {"ok": "v", "": "empty key"}):
        request = operator_pb2.SetDeviceLabelsRequest(device_id=device.id, set=change)
        assert (await refusal(op.SetDeviceLabels(request)))[0] == grpc.StatusCode.INVALID_ARGUMENT
    pin = operator_pb2.SetVariantPinRequest(selector={"hw": "z" * 200}, variant_id="gguf-q4_0")
    assert (await refusal(op.SetVariantPin(pin)))[0] == grpc.StatusCode.INVALID_ARGUMENT
    [listed] = (await op.ListDevices(operator_pb2.ListDevicesRequest())).devices
    assert dict(listed.labels) == {"hw": "cpu"}


async def test_listings_page_by_size_and_by_bytes(
    op: operator_pb2_grpc.OperatorServiceStub,
    channel: grpc.aio.Channel,
    tmp_path: Path,
    controlplane: RunningControlPlane,
) -> None:
    token = (await op.CreateToken(operator_pb2.CreateTokenRequest(uses=5))).token
    enrolled = [(await enroll_device(controlplane, channel, token, tmp_path)).id for _ in range(5)]
    # Labels stored before labels were bounded: each device's summary would be 7.7 MB.
    with Session(controlplane.engine) as s, s.begin():
        for device_id in enrolled[:3]:
            row = s.get(Device, device_id)
            assert row is not None
            row.labels = HUGE_LABELS
            s.add(row)

    seen: list[str] = []
    request = operator_pb2.ListDevicesRequest(page_size=2)
    while True:
        page = await op.ListDevices(request)
        assert 1 <= len(page.devices) <= 2 and page.ByteSize() < MAX_MESSAGE_BYTES // 2
        seen += [d.device_id for d in page.devices]
        if not page.next_page_token:
            break
        request.page_token = page.next_page_token
    assert seen == enrolled  # enrollment order, each device once
    assert all(
        len(v) <= 128
        for d in (await op.ListDevices(operator_pb2.ListDevicesRequest())).devices
        for v in d.labels.values()
    )

    other_filters = operator_pb2.QueryTelemetryRequest(
        kind="inference", page_token=page.next_page_token or "eyJtIjoxfQ"
    )
    assert (await refusal(op.QueryTelemetry(other_filters)))[0] == grpc.StatusCode.INVALID_ARGUMENT
    garbage = operator_pb2.ListDevicesRequest(page_token="not a token")
    assert (await refusal(op.ListDevices(garbage)))[0] == grpc.StatusCode.INVALID_ARGUMENT


async def test_a_huge_stored_record_does_not_break_telemetry_queries(
    op: operator_pb2_grpc.OperatorServiceStub, controlplane: RunningControlPlane
) -> None:
    with Session(controlplane.engine) as s, s.begin():
        s.add(TelemetryRecord(device_id="dev-a", kind="inference", seq=1, time=utcnow(), payload={"n": 1}))
        s.add(
            TelemetryRecord(
                device_id="dev-a", kind="inference", seq=2, time=utcnow(), payload={"blob": "x" * 10_000_000}
            )
        )
        s.add(TelemetryRecord(device_id="dev-a", kind="inference", seq=3, time=utcnow(), payload={"n": 3}))
    rows = []
    request = operator_pb2.QueryTelemetryRequest(device_id="dev-a", page_size=1000)
    while True:
        page = await op.QueryTelemetry(request)
        rows += page.rows
        if not page.next_page_token:
            break
        request.page_token = page.next_page_token
    assert [r.seq for r in rows] == [3, 2, 1]
    assert [r.payload_truncated for r in rows] == [False, True, False]
    assert rows[1].payload_bytes > 10_000_000 and rows[1].payload_json == "{}"


async def test_errors_do_not_echo_unbounded_input(op: operator_pb2_grpc.OperatorServiceStub) -> None:
    await op.CreateToken(operator_pb2.CreateTokenRequest())  # something to deploy against is not needed
    unknown = [f"dev-{i:012x}" for i in range(5_000)]
    code, details = await refusal(op.Undeploy(operator_pb2.UndeployRequest(name="m", device_ids=unknown)))
    assert code == grpc.StatusCode.NOT_FOUND and len(details) <= MAX_ERROR_CHARS
    assert details.startswith("5000 ")  # says how many, names the first few

    too_many = [f"dev-{i:012x}" for i in range(50_000)]
    code, details = await refusal(
        op.Deploy(operator_pb2.DeployRequest(bundle={"name": "m", "version": 1}, device_ids=too_many))
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT and len(details) <= MAX_ERROR_CHARS
    code, details = await refusal(op.RevokeDevice(operator_pb2.RevokeDeviceRequest(device_id="d" * 16_000)))
    assert code == grpc.StatusCode.NOT_FOUND and len(details) <= MAX_ERROR_CHARS
