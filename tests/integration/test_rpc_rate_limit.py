"""A stranger's refused enrollments are rate-limited per peer, and what they cost the audit
trail is bounded: real sockets, the real control plane."""

from __future__ import annotations

import json

import grpc
import pytest

from edgefleet.agent.device.tls import csr_pem, new_key
from edgefleet.controlplane.api.ratelimit import RETRY_AFTER_KEY, STATUS_DETAILS_KEY, RateLimit
from edgefleet.protos.fleet.v1 import device_pb2, device_pb2_grpc, operator_pb2, operator_pb2_grpc

pytestmark = pytest.mark.integration


async def test_bad_enrollments_are_limited_and_audited_in_bounded_rows(
    op: operator_pb2_grpc.OperatorServiceStub, channel: grpc.aio.Channel
) -> None:
    dev = device_pb2_grpc.DeviceServiceStub(channel)
    request = device_pb2.EnrollRequest(bootstrap_token="not-a-token", csr=csr_pem(new_key(), "x"))
    codes: list[grpc.StatusCode] = []
    limited: grpc.aio.AioRpcError | None = None
    for _ in range(int(RateLimit().burst) * 3):
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await dev.Enroll(request)
        codes.append(refused.value.code())
        if refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
            limited = refused.value
    assert codes[: int(RateLimit().burst)] == [grpc.StatusCode.PERMISSION_DENIED] * int(RateLimit().burst)
    assert limited is not None
    trailers = dict(limited.trailing_metadata() or ())
    assert int(trailers[RETRY_AFTER_KEY]) >= 1 and trailers[STATUS_DETAILS_KEY]

    # 60 refusals, yet the first of each kind is audited and the rest wait for the summary.
    entries = (await op.ListAudit(operator_pb2.ListAuditRequest(actor="device:unenrolled"))).entries
    assert [(e.action, e.outcome) for e in entries] == [("device.enroll", "refused")]
    assert json.loads(entries[0].detail_json)["peer"] == "127.0.0.1"
    rate = (await op.ListAudit(operator_pb2.ListAuditRequest(action="rpc.Enroll"))).entries
    assert len(rate) == 1 and json.loads(rate[0].detail_json)["kind"] == "RESOURCE_EXHAUSTED:rate"
    assert (await op.VerifyAudit(operator_pb2.VerifyAuditRequest())).ok
