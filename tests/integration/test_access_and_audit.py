"""Operator roles and the audit trail, over real sockets with a real SQLite store."""

from __future__ import annotations

import grpc
import pytest
from sqlalchemy import text

from edgefleet.agent.device.tls import csr_pem, new_key
from edgefleet.controlplane.app.server import RunningControlPlane
from edgefleet.protos.fleet.v1 import device_pb2, device_pb2_grpc, operator_pb2, operator_pb2_grpc
from tests.integration.conftest import OperatorToken, public_channel

pytestmark = pytest.mark.integration


async def stub_for(
    controlplane: RunningControlPlane, token: str | None
) -> operator_pb2_grpc.OperatorServiceStub:
    interceptors = [OperatorToken(token)] if token else []
    channel = public_channel(controlplane, interceptors=interceptors)
    return operator_pb2_grpc.OperatorServiceStub(channel)


@pytest.fixture
async def tokens(op: operator_pb2_grpc.OperatorServiceStub) -> dict[str, str]:
    made = {}
    for role in ("viewer", "operator"):
        made[role] = (
            await op.CreateOperator(operator_pb2.CreateOperatorRequest(name=f"a-{role}", role=role))
        ).token
    return made


async def code_of(call: object) -> grpc.StatusCode:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call  # type: ignore[misc]
    return err.value.code()


async def test_viewer_reads_but_cannot_deploy(
    controlplane: RunningControlPlane, tokens: dict[str, str]
) -> None:
    viewer = await stub_for(controlplane, tokens["viewer"])
    await viewer.ListDevices(operator_pb2.ListDevicesRequest())
    deploy = viewer.Deploy(operator_pb2.DeployRequest(bundle={"name": "m", "version": 1}, all_devices=True))
    assert await code_of(deploy) == grpc.StatusCode.PERMISSION_DENIED
    undeploy = viewer.Undeploy(operator_pb2.UndeployRequest(name="m", all_devices=True))
    assert await code_of(undeploy) == grpc.StatusCode.PERMISSION_DENIED
    token = viewer.CreateToken(operator_pb2.CreateTokenRequest())
    assert await code_of(token) == grpc.StatusCode.PERMISSION_DENIED


async def test_operator_cannot_manage_keys_tokens_or_operators(
    controlplane: RunningControlPlane, tokens: dict[str, str], op: operator_pb2_grpc.OperatorServiceStub
) -> None:
    operator = await stub_for(controlplane, tokens["operator"])
    root = (await op.ListAudit(operator_pb2.ListAuditRequest())).entries  # admin can read the trail
    assert root
    assert (
        await code_of(operator.PushRoot(operator_pb2.PushRootRequest(repository="image", root=b"{}")))
        == grpc.StatusCode.PERMISSION_DENIED
    )
    assert (
        await code_of(operator.CreateToken(operator_pb2.CreateTokenRequest()))
        == grpc.StatusCode.PERMISSION_DENIED
    )
    create = operator.CreateOperator(operator_pb2.CreateOperatorRequest(name="x", role="admin"))
    assert await code_of(create) == grpc.StatusCode.PERMISSION_DENIED
    # But it may deploy and undeploy (here: refused for an unknown bundle or device, which proves
    # it got past the role check), and the refusals are audited under its name.
    deploy = operator.Deploy(operator_pb2.DeployRequest(bundle={"name": "m", "version": 1}, all_devices=True))
    assert await code_of(deploy) == grpc.StatusCode.NOT_FOUND
    undeploy = operator.Undeploy(operator_pb2.UndeployRequest(name="m", device_ids=["dev-nope"]))
    assert await code_of(undeploy) == grpc.StatusCode.NOT_FOUND
    refused = (await op.ListAudit(operator_pb2.ListAuditRequest(actor="operator:a-operator"))).entries
    assert [(e.action, e.target, e.outcome) for e in reversed(refused)] == [
        # Refused for its role: audited too, naming the call.
        ("operator.authorize", "PushRoot", "refused"),
        ("operator.authorize", "CreateToken", "refused"),
        ("operator.authorize", "CreateOperator", "refused"),
        ("deploy", "m@1", "refused"),
        ("undeploy", "m", "refused"),
    ]
    # An undeploy that finds no device holding the model changes nothing, and is recorded too.
    assert not (await operator.Undeploy(operator_pb2.UndeployRequest(name="m", all_devices=True))).device_ids
    entry = (await op.ListAudit(operator_pb2.ListAuditRequest(action="undeploy"))).entries[0]
    assert (entry.actor, entry.outcome, entry.detail_json) == ("operator:a-operator", "ok", '{"devices": {}}')


async def test_missing_and_revoked_tokens(
    controlplane: RunningControlPlane, tokens: dict[str, str], op: operator_pb2_grpc.OperatorServiceStub
) -> None:
    anonymous = await stub_for(controlplane, None)
    assert (
        await code_of(anonymous.ListDevices(operator_pb2.ListDevicesRequest()))
        == grpc.StatusCode.UNAUTHENTICATED
    )
    viewer = await stub_for(controlplane, tokens["viewer"])
    assert (await op.RevokeOperator(operator_pb2.RevokeOperatorRequest(name="a-viewer"))).revoked
    assert (
        await code_of(viewer.ListDevices(operator_pb2.ListDevicesRequest()))
        == grpc.StatusCode.UNAUTHENTICATED
    )


async def test_audit_records_changes_and_detects_tampering(
    controlplane: RunningControlPlane, op: operator_pb2_grpc.OperatorServiceStub, channel: grpc.aio.Channel
) -> None:
    token = (await op.CreateToken(operator_pb2.CreateTokenRequest(uses=1))).token
    dev = device_pb2_grpc.DeviceServiceStub(channel)
    enrolled = await dev.Enroll(
        device_pb2.EnrollRequest(bootstrap_token=token, hostname="h", csr=csr_pem(new_key(), "h"))
    )
    with pytest.raises(grpc.aio.AioRpcError):  # reused by another device: refused, and recorded
        await dev.Enroll(device_pb2.EnrollRequest(bootstrap_token=token, csr=csr_pem(new_key(), "x")))
    entries = (await op.ListAudit(operator_pb2.ListAuditRequest())).entries
    actions = [(e.action, e.outcome) for e in reversed(entries)]
    assert ("token.create", "ok") in actions
    assert ("device.enroll", "ok") in actions
    assert ("device.enroll", "refused") in actions
    assert any(e.target == enrolled.device_id for e in entries)
    verified = await op.VerifyAudit(operator_pb2.VerifyAuditRequest())
    assert verified.ok and verified.entries == len(entries)

    with controlplane.engine.begin() as conn:
        conn.execute(text("UPDATE auditentry SET actor = 'someone-else' WHERE seq = 2"))
    broken = await op.VerifyAudit(operator_pb2.VerifyAuditRequest())
    assert not broken.ok and broken.broken_at == 2 and "modified" in broken.reason


async def test_audit_detects_a_deleted_row(
    controlplane: RunningControlPlane, op: operator_pb2_grpc.OperatorServiceStub
) -> None:
    for _ in range(3):
        await op.CreateToken(operator_pb2.CreateTokenRequest())
    with controlplane.engine.begin() as conn:
        conn.execute(text("DELETE FROM auditentry WHERE seq = 2"))
    broken = await op.VerifyAudit(operator_pb2.VerifyAuditRequest())
    assert not broken.ok and broken.broken_at == 3
