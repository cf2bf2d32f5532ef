"""TailTelemetry end to end: the gRPC server streams rows stored in its database while the
call is open, and `fleetctl telemetry tail` prints them until Ctrl-C; `fleetctl telemetry
query` reads the inference summaries with --device and --kind.

Rows are stored in the control plane's own database with its own table, as the ingestor stores
them: the payload is the record as protobuf's JSON mapping writes it.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf.message import Message
from sqlmodel import Session
from typer.testing import CliRunner

from edgefleet.agent.telemetry.outbox import encode_message
from edgefleet.controlplane.app.server import RunningControlPlane
from edgefleet.controlplane.cli.main import app as fleetctl
from edgefleet.controlplane.store.models import TelemetryRecord
from edgefleet.protos.fleet.v1 import common_pb2, operator_pb2, operator_pb2_grpc, telemetry_pb2
from tests.integration.conftest import admin_token, public_channel

pytestmark = pytest.mark.integration

READ_TIMEOUT_S = 20.0


def inference(device_id: str, seq: int, tokens_per_second: float = 40.0) -> telemetry_pb2.InferenceSummary:
    record = telemetry_pb2.InferenceSummary(
        schema_version=1,
        device_id=device_id,
        seq=seq,
        model="smollm2",
        bundle=common_pb2.BundleRef(name="smollm2", version=1),
        variant="gguf-q4_0",
        requests=3,
        requests_by_endpoint={"chat.completions": 3},
        completion_tokens=96,
        latency_ms_p50=120.0,
        tokens_per_second=tokens_per_second,
    )
    record.time.FromDatetime(datetime.now(UTC))
    return record


def heartbeat(device_id: str, seq: int) -> telemetry_pb2.Heartbeat:
    record = telemetry_pb2.Heartbeat(
        schema_version=1, device_id=device_id, seq=seq, state=common_pb2.DEVICE_STATE_ACTIVE
    )
    record.time.FromDatetime(datetime.now(UTC))
    return record


KIND = {telemetry_pb2.InferenceSummary: "inference", telemetry_pb2.Heartbeat: "heartbeat"}


def store(controlplane: RunningControlPlane, *records: Message) -> None:
    """Commits each record in its own transaction, in order, as the ingestor's batches would."""
    for record in records:
        with Session(controlplane.engine) as s, s.begin():
            s.add(
                TelemetryRecord(
                    device_id=record.device_id,  # type: ignore[attr-defined]
                    kind=KIND[type(record)],
                    seq=record.seq,  # type: ignore[attr-defined]
                    time=datetime.now(UTC),
                    payload=json.loads(encode_message(record)),
                )
            )


@pytest.fixture
async def stub(
    controlplane: RunningControlPlane,
) -> AsyncIterator[operator_pb2_grpc.OperatorServiceStub]:
    async with public_channel(controlplane) as ch:
        yield operator_pb2_grpc.OperatorServiceStub(ch)


def auth(token: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {token}")]


async def next_row(call: Any) -> operator_pb2.TelemetryRow:
    row = await asyncio.wait_for(call.read(), READ_TIMEOUT_S)
    assert row is not grpc.aio.EOF
    assert isinstance(row, operator_pb2.TelemetryRow)
    return row


def ids(rows: list[operator_pb2.TelemetryRow]) -> list[tuple[str, str, int]]:
    return [(r.device_id, r.kind, r.seq) for r in rows]


async def test_tail_sends_the_backlog_then_rows_as_they_are_stored(
    controlplane: RunningControlPlane, stub: operator_pb2_grpc.OperatorServiceStub, tmp_path: Path
) -> None:
    store(controlplane, heartbeat("d1", 1), inference("d1", 2), inference("d2", 1), inference("d1", 3))
    token = admin_token(tmp_path)
    # backlog=1: reading that row proves this tail has started before new rows are stored.
    everything = stub.TailTelemetry(operator_pb2.TailTelemetryRequest(backlog=1), metadata=auth(token))
    inference_d1 = stub.TailTelemetry(
        operator_pb2.TailTelemetryRequest(device_id="d1", kind="inference", backlog=2), metadata=auth(token)
    )
    try:
        assert ids([await next_row(everything)]) == [("d1", "inference", 3)]
        backlog = [await next_row(inference_d1), await next_row(inference_d1)]
        assert ids(backlog) == [("d1", "inference", 2), ("d1", "inference", 3)], "newest N, oldest first"
        assert json.loads(backlog[1].payload_json)["tokensPerSecond"] == 40.0
        assert backlog[1].time.ToDatetime(tzinfo=UTC) <= datetime.now(UTC)

        store(
            controlplane, heartbeat("d1", 4), inference("d2", 2), inference("d1", 5, tokens_per_second=55.5)
        )
        assert ids([await next_row(inference_d1)]) == [("d1", "inference", 5)]
        new = [await next_row(everything) for _ in range(3)]
        assert ids(new) == [("d1", "heartbeat", 4), ("d2", "inference", 2), ("d1", "inference", 5)], (
            "after the backlog, only rows stored after the call began, in the order they were stored"
        )
        payload = json.loads(new[2].payload_json)
        assert payload["tokensPerSecond"] == 55.5 and payload["requestsByEndpoint"] == {
            "chat.completions": "3"
        }
    finally:
        everything.cancel()
        inference_d1.cancel()


async def test_tail_catches_up_on_a_burst_larger_than_one_poll(
    controlplane: RunningControlPlane, stub: operator_pb2_grpc.OperatorServiceStub, tmp_path: Path
) -> None:
    store(controlplane, heartbeat("marker", 1))
    call = stub.TailTelemetry(
        operator_pb2.TailTelemetryRequest(kind="heartbeat", backlog=1), metadata=auth(admin_token(tmp_path))
    )
    try:
        assert ids([await next_row(call)]) == [("marker", "heartbeat", 1)]  # the tail has its start
        with Session(controlplane.engine) as s, s.begin():  # one batch, more than TAIL_BATCH_ROWS
            for seq in range(1, 1201):
                record = heartbeat("burst", seq)
                payload = json.loads(encode_message(record))
                s.add(
                    TelemetryRecord(
                        device_id="burst", kind="heartbeat", seq=seq, time=datetime.now(UTC), payload=payload
                    )
                )
        seqs = [(await next_row(call)).seq for _ in range(1200)]
        assert seqs == list(range(1, 1201))
    finally:
        call.cancel()


async def test_tail_needs_a_viewer_and_a_known_kind(
    controlplane: RunningControlPlane,
    stub: operator_pb2_grpc.OperatorServiceStub,
    op: operator_pb2_grpc.OperatorServiceStub,
    tmp_path: Path,
) -> None:
    anonymous = stub.TailTelemetry(operator_pb2.TailTelemetryRequest())
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await anonymous.read()
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED

    typo = stub.TailTelemetry(
        operator_pb2.TailTelemetryRequest(kind="inferences"), metadata=auth(admin_token(tmp_path))
    )
    with pytest.raises(grpc.aio.AioRpcError) as invalid:
        await typo.read()
    assert invalid.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "deployment, heartbeat, inference" in (invalid.value.details() or "")

    viewer = (await op.CreateOperator(operator_pb2.CreateOperatorRequest(name="v", role="viewer"))).token
    store(controlplane, inference("d9", 1))
    call = stub.TailTelemetry(operator_pb2.TailTelemetryRequest(backlog=1), metadata=auth(viewer))
    try:
        assert ids([await next_row(call)]) == [("d9", "inference", 1)]
    finally:
        call.cancel()


def fleetctl_env(controlplane: RunningControlPlane, tmp_path: Path) -> dict[str, str]:
    ca = tmp_path / "ca.pem"
    ca.write_bytes(controlplane.ca_pem)
    return {
        "EDGEFLEET_TLS_CA": str(ca),
        "EDGEFLEET_OPERATOR_TOKEN": admin_token(tmp_path),
        "EDGEFLEET_CONTROLPLANE": f"127.0.0.1:{controlplane.port}",
        "EDGEFLEET_HOME": str(tmp_path / "home"),
    }


async def read_json_line(stream: asyncio.StreamReader) -> dict[str, Any]:
    line = await asyncio.wait_for(stream.readline(), READ_TIMEOUT_S)
    assert line, "fleetctl ended its output"
    result: dict[str, Any] = json.loads(line)
    return result


async def test_fleetctl_telemetry_tail_prints_rows_until_ctrl_c(
    controlplane: RunningControlPlane, tmp_path: Path
) -> None:
    store(controlplane, inference("d1", 1), heartbeat("d1", 2))
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "edgefleet.controlplane.cli",
        "telemetry",
        "tail",
        "--kind",
        "inference",
        "--backlog",
        "5",
        env={**os.environ, **fleetctl_env(controlplane, tmp_path)},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None and proc.stderr is not None
        first = await read_json_line(proc.stdout)
        assert (first["device"], first["kind"], first["seq"]) == ("d1", "inference", 1)
        store(controlplane, heartbeat("d1", 3), inference("d2", 7, tokens_per_second=12.5))
        second = await read_json_line(proc.stdout)
        assert (second["device"], second["kind"], second["seq"]) == ("d2", "inference", 7)
        assert second["payload"]["tokensPerSecond"] == 12.5
        proc.send_signal(signal.SIGINT)
        assert await asyncio.wait_for(proc.wait(), READ_TIMEOUT_S) == 0
        assert b"Traceback" not in await proc.stderr.read()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_fleetctl_telemetry_query_reads_inference_summaries(
    controlplane: RunningControlPlane, tmp_path: Path
) -> None:
    store(controlplane, inference("d1", 1), heartbeat("d1", 2), inference("d2", 1), inference("d1", 3, 33.0))
    env = fleetctl_env(controlplane, tmp_path)

    def query(*args: str) -> list[dict[str, Any]]:
        result = CliRunner().invoke(fleetctl, ["telemetry", "query", *args], env=env)
        assert result.exit_code == 0, result.output
        return [json.loads(line) for line in result.stdout.splitlines()]

    rows = await asyncio.to_thread(query, "--device", "d1", "--kind", "inference")
    assert [(r["device"], r["kind"], r["seq"]) for r in rows] == [
        ("d1", "inference", 3),
        ("d1", "inference", 1),
    ]
    assert rows[0]["payload"]["tokensPerSecond"] == 33.0
    assert rows[0]["payload"]["bundle"] == {"name": "smollm2", "version": "1"}
    everything = await asyncio.to_thread(query, "--limit", "2")
    assert [(r["device"], r["seq"]) for r in everything] == [("d1", 3), ("d2", 1)]
