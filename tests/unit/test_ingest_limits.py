"""Every value of a telemetry message is held to what the database can store, and every message
to the sizes the control plane will hold, before anything is written (no broker, no database)."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from edgefleet.controlplane.store.telemetry import IngestRecord, _figures
from edgefleet.controlplane.store.values import json_number
from edgefleet.controlplane.telemetry.decode import (
    MAX_CLOCK_SKEW,
    MAX_MESSAGE_BYTES,
    RejectedMessage,
    RejectReason,
    decode,
    decode_message,
)
from edgefleet.controlplane.telemetry.record_shape import MAX_RECORDS_PER_MESSAGE
from edgefleet.protos.fleet.topics import TopicKind, presence_topic, telemetry_topic

DEVICE = "dev-1"
ARRIVED = datetime(2025, 6, 1, 12, 0, 0, tzinfo=UTC)
HEARTBEATS = telemetry_topic(DEVICE, TopicKind.HEARTBEAT)
INFERENCE = telemetry_topic(DEVICE, TopicKind.INFERENCE)


def record(seq: Any = 1, **fields: Any) -> dict[str, Any]:
    return {"schemaVersion": 1, "deviceId": DEVICE, "seq": seq, "time": "2025-06-01T11:00:00Z", **fields}


def payload(*records: Any) -> bytes:
    return json.dumps(list(records)).encode()


def reason_of(topic: str, body: bytes) -> RejectReason:
    with pytest.raises(RejectedMessage) as caught:
        decode(topic, body, arrived=ARRIVED)
    return caught.value.reason


@pytest.mark.parametrize(
    ("topic", "bad", "path"),
    [
        (HEARTBEATS, record(2**63), "$.seq"),  # beyond BIGINT, as a number
        (HEARTBEATS, record(str(2**63)), "$.seq"),  # and as a digit string
        (HEARTBEATS, record(1, requestsTotal=2**64), "$.requestsTotal"),  # beyond uint64 too
        (HEARTBEATS, record(1, rssBytes="99999999999999999999"), "$.rssBytes"),
        (HEARTBEATS, record(1, requestsTotal="-1"), "$.requestsTotal"),  # a uint64 has no sign
        (HEARTBEATS, record(1, schemaVersion="4294967296"), "$.schemaVersion"),  # uint32, as digits
        (HEARTBEATS, record(1, cpuPercent=float("inf")), "$.cpuPercent"),  # written as 1e999 below
        (INFERENCE, record(1, errorsByCode={"queue_full": 2**63}), '$.errorsByCode["queue_full"]'),
    ],
)
def test_numbers_beyond_their_field_are_out_of_range_and_named(
    topic: str, bad: dict[str, Any], path: str
) -> None:
    """Well-formed JSON, a number its column cannot hold: out_of_range, with where it is."""
    body = payload(record(7), bad).replace(b"Infinity", b"1e999")  # JSON has no infinity literal
    with pytest.raises(RejectedMessage) as caught:
        decode(topic, body, arrived=ARRIVED)
    assert caught.value.reason is RejectReason.OUT_OF_RANGE
    assert f"record 1: {path} = " in str(caught.value)


@pytest.mark.parametrize(
    "bad",
    [
        record(1, variant="x" * 5000),  # longer than any string kept
        record(1, requestsTotal=1.5),  # a fraction where an integer belongs
        record(1, requestsTotal="12a"),
        record(1, cpuPercent="fast"),
    ],
)
def test_values_of_the_wrong_shape_are_malformed(bad: dict[str, Any]) -> None:
    assert reason_of(HEARTBEATS, payload(bad)) is RejectReason.MALFORMED


def test_a_literal_nan_is_malformed_not_out_of_range() -> None:
    """Python's json reads NaN; it is not JSON, and stays malformed."""
    body = b'[{"schemaVersion": 1, "deviceId": "dev-1", "seq": 1, "cpuPercent": NaN}]'
    assert reason_of(HEARTBEATS, body) is RejectReason.MALFORMED


def test_the_largest_storable_values_are_kept() -> None:
    batch = decode_message(
        HEARTBEATS, payload(record(2**63 - 1, requestsTotal=str(2**63 - 1))), arrived=ARRIVED
    )
    assert batch.records[0].seq == 2**63 - 1


def test_maps_and_lists_are_bounded() -> None:
    many = {f"code{i}": 1 for i in range(300)}
    assert reason_of(INFERENCE, payload(record(1, errorsByCode=many))) is RejectReason.MALFORMED


def test_too_many_records_are_refused_before_any_is_built() -> None:
    body = payload(*[record(i + 1) for i in range(MAX_RECORDS_PER_MESSAGE + 1)])
    assert len(body) < MAX_MESSAGE_BYTES
    assert reason_of(HEARTBEATS, body) is RejectReason.TOO_MANY_RECORDS


def test_a_record_too_large_is_refused() -> None:
    models = [{"name": "n" * 4000, "variant": "v" * 4000} for _ in range(10)]
    assert reason_of(HEARTBEATS, payload(record(1, models=models))) is RejectReason.RECORD_TOO_LARGE


def test_an_oversized_payload_is_refused_by_its_length() -> None:
    body = b"[" + b" " * MAX_MESSAGE_BYTES + b"]"
    assert reason_of(HEARTBEATS, body) is RejectReason.OVERSIZED
    assert reason_of(presence_topic(DEVICE), body) is RejectReason.OVERSIZED


def test_a_device_id_longer_than_its_column_is_refused() -> None:
    long_id = "d" * 65
    topic = telemetry_topic(long_id, TopicKind.HEARTBEAT)
    assert reason_of(topic, payload({**record(1), "deviceId": long_id})) is RejectReason.BAD_TOPIC


def test_a_record_from_the_future_is_stored_at_its_arrival() -> None:
    ahead = (ARRIVED + MAX_CLOCK_SKEW + timedelta(seconds=1)).isoformat()
    near = (ARRIVED + MAX_CLOCK_SKEW - timedelta(seconds=1)).isoformat()
    batch = decode_message(HEARTBEATS, payload(record(1, time=ahead), record(2, time=near)), arrived=ARRIVED)
    assert [r.time for r in batch.records] == [ARRIVED, ARRIVED + MAX_CLOCK_SKEW - timedelta(seconds=1)]
    assert batch.clamped == 1


def test_device_figures_fit_their_columns() -> None:
    assert json_number("NaN") == 0.0 and json_number("Infinity") == 0.0
    heartbeat = IngestRecord(DEVICE, "heartbeat", 1, ARRIVED, {"requestsTotal": str(2**63 - 1)})
    assert _figures(heartbeat) == {"requests_total": 2**63 - 1}  # exact, not through a float
    summary = IngestRecord(DEVICE, "inference", 1, ARRIVED, {"requests": 2, "latencyMsP95": "NaN"})
    assert _figures(summary) == {"last_latency_ms": 0.0}
