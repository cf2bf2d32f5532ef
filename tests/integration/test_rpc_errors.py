"""Refusals that used to reach callers as ``UNKNOWN: Unexpected <class ...>`` are typed,
carry the right status, and land in the audit trail. Real sockets and control plane."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from bench.sim_fleet import build_sim_bundle
from edgefleet.controlplane.trust.keys import KeyDir
from edgefleet.protos.fleet.v1 import device_pb2, device_pb2_grpc, operator_pb2, operator_pb2_grpc
from tests.integration.conftest import admin_token
from tests.integration.test_rpc_fuzz import csr_with_unknown_key_algorithm, non_hex_digests, resigned_release

pytestmark = pytest.mark.integration


async def test_a_signed_release_with_a_non_hex_sha256_is_refused_and_audited(
    op: operator_pb2_grpc.OperatorServiceStub, keys: KeyDir, tmp_path: Path
) -> None:
    bundle = build_sim_bundle(tmp_path, keys.release_signers())
    metadata = resigned_release(bundle.release.metadata, keys.release_signers(), non_hex_digests)
    artifact = next(iter(bundle.release.artifacts))

    async def requests() -> AsyncIterator[operator_pb2.PushBundleRequest]:
        yield operator_pb2.PushBundleRequest(header=operator_pb2.PushHeader(release_metadata=metadata))
        yield operator_pb2.PushBundleRequest(artifact=operator_pb2.ArtifactData(path=artifact, data=b"x"))

    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await op.PushBundle(requests(), metadata=(("authorization", f"Bearer {admin_token(tmp_path)}"),))
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    [entry] = (await op.ListAudit(operator_pb2.ListAuditRequest(action="bundle.push"))).entries
    assert (entry.outcome, entry.target) == ("refused", "simlm@1")
    assert json.loads(entry.detail_json)["reason"] == refused.value.details()


async def test_a_csr_with_an_unknown_key_algorithm_is_refused_and_audited(
    op: operator_pb2_grpc.OperatorServiceStub, channel: grpc.aio.Channel
) -> None:
    token = (await op.CreateToken(operator_pb2.CreateTokenRequest())).token
    dev = device_pb2_grpc.DeviceServiceStub(channel)
    request = device_pb2.EnrollRequest(bootstrap_token=token, csr=csr_with_unknown_key_algorithm())
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await dev.Enroll(request)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    [entry] = (await op.ListAudit(operator_pb2.ListAuditRequest(action="device.enroll"))).entries
    assert (entry.actor, entry.outcome) == ("device:unenrolled", "refused")
    assert json.loads(entry.detail_json)["kind"] == "INVALID_ARGUMENT:Refused"
