"""What the control plane makes of a telemetry, presence or status payload, without a broker:
record streams are JSON arrays accepted or rejected whole; presence and status are objects."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from edgefleet.agent.telemetry.outbox import encode_batch, encode_message
from edgefleet.controlplane.store.telemetry import PresenceUpdate, StatusUpdate
from edgefleet.controlplane.telemetry.decode import (
    RejectedMessage,
    RejectReason,
    TelemetryBatch,
    decode,
    decode_message,
    decode_presence,
    decode_status,
)
from edgefleet.controlplane.telemetry.ingest import replica_client_id
from edgefleet.protos.fleet.topics import TopicKind, presence_topic, status_topic, telemetry_topic
from edgefleet.protos.fleet.v1 import common_pb2, telemetry_pb2

DEVICE = "dev-1"
ARRIVED = datetime(2025, 6, 1, 12, 0, 0, tzinfo=UTC)
HEARTBEATS = telemetry_topic(DEVICE, TopicKind.HEARTBEAT)
INFERENCE = telemetry_topic(DEVICE, TopicKind.INFERENCE)


def heartbeat(seq: int, **fields: Any) -> dict[str, Any]:
    return {"schemaVersion": 1, "deviceId": DEVICE, "seq": str(seq), "time": "2025-06-01T11:00:00Z", **fields}


def array(*records: Any) -> bytes:
    return json.dumps(list(records)).encode()


def rejected(reason: RejectReason, topic: str, payload: bytes) -> None:
    with pytest.raises(RejectedMessage) as caught:
        decode(topic, payload, arrived=ARRIVED)
    assert caught.value.reason is reason, caught.value


# record streams -------------------------------------------------------------------------------


def test_an_array_becomes_its_records_in_order_without_unknown_fields() -> None:
    payload = array(
        heartbeat(7, requestsTotal="5", someFutureField={"ignored": True}),
        heartbeat(8, requestsTotal=6, cpuPercent=12.5),  # 64-bit integers as numbers too
    )
    batch = decode_message(HEARTBEATS, payload)
    assert [(r.device_id, r.kind, r.seq) for r in batch.records] == [
        (DEVICE, "heartbeat", 7),
        (DEVICE, "heartbeat", 8),
    ]
    first, second = batch.records
    assert first.time == datetime(2025, 6, 1, 11, 0, tzinfo=UTC)
    assert "someFutureField" not in first.payload  # a newer agent's field: dropped
    assert first.payload["requestsTotal"] == "5"
    assert (second.payload["requestsTotal"], second.payload["cpuPercent"]) == (6, 12.5)


def test_what_the_agent_writes_is_what_the_control_plane_reads() -> None:
    summary = telemetry_pb2.InferenceSummary(
        schema_version=1,
        device_id=DEVICE,
        seq=3,
        model="smollm2",
        bundle=common_pb2.BundleRef(name="smollm2", version=2),
        requests=4,
        errors=1,
        errors_by_code={"queue_full": 1},
        requests_by_endpoint={"chat.completions": 4},
        latency_ms_p95=120.5,
        tokens_per_second=81.0,
    )
    summary.time.FromDatetime(ARRIVED)
    [record] = decode_message(INFERENCE, encode_batch([encode_message(summary)])).records
    assert record.seq == 3
    assert record.time == ARRIVED
    assert record.payload["errorsByCode"] == {"queue_full": "1"}
    assert record.payload["latencyMsP95"] == 120.5
    assert record.payload["bundle"] == {"name": "smollm2", "version": "2"}


def test_a_record_without_time_is_stamped_on_arrival() -> None:
    record = {"schemaVersion": 1, "deviceId": DEVICE, "seq": "1"}
    before = datetime.now(UTC)
    [decoded] = decode_message(HEARTBEATS, array(record)).records
    assert decoded.time >= before


@pytest.mark.parametrize(
    "payload",
    [
        b"{not json",
        b"\xff\xfe\x00",
        b"",
        json.dumps(heartbeat(1)).encode(),  # one object: the format before arrays
        b"[]",
        b"[1, 2]",
        array(heartbeat(1), "x"),
        array(heartbeat(1), heartbeat(2) | {"seq": "x"}),  # one bad element spoils the message
        array(heartbeat(1), {"deviceId": DEVICE}),  # no seq
        array(heartbeat(1, time="not a time")),
        array(heartbeat(1, requestsTotal="many")),
        array(heartbeat(1, activeBundle="smollm2")),  # a message field that is not an object
        b"[" * 100_000 + b"]" * 100_000,
        array(heartbeat(1, activeBundle={"name": {"deep": [[[]]]}})),
    ],
)
def test_a_malformed_array_or_element_rejects_the_whole_message(payload: bytes) -> None:
    rejected(RejectReason.MALFORMED, HEARTBEATS, payload)


def test_a_record_of_another_device_rejects_the_whole_message() -> None:
    other = heartbeat(2) | {"deviceId": "dev-victim"}
    rejected(RejectReason.DEVICE_MISMATCH, HEARTBEATS, array(heartbeat(1), other))


def test_an_enum_value_from_a_newer_schema_is_kept_but_wrong_types_are_malformed() -> None:
    [record] = decode_message(HEARTBEATS, array(heartbeat(1, state="DEVICE_STATE_FROM_THE_FUTURE"))).records
    assert record.payload["state"] == "DEVICE_STATE_FROM_THE_FUTURE"
    rejected(RejectReason.MALFORMED, HEARTBEATS, array(heartbeat(1, uptimeSeconds="fast")))


@pytest.mark.parametrize(
    "topic",
    [
        "fleet/v1/devices/dev-1/telemetry/unknown-kind",
        "fleet/v1/devices/dev-1/heartbeat",
        "other/topic",
        "fleet/v1/devices/dev-1/telemetry/heartbeat/extra",
    ],
)
def test_unknown_topics_are_rejected(topic: str) -> None:
    rejected(RejectReason.BAD_TOPIC, topic, array(heartbeat(1)))


# presence and status ---------------------------------------------------------------------------


def presence_payload(*, online: bool, when: datetime | None, device_id: str = DEVICE) -> bytes:
    presence = telemetry_pb2.Presence(schema_version=1, device_id=device_id, online=online, reason="r")
    if when is not None:
        presence.time.FromDatetime(when)
    return encode_message(presence)


def test_presence_carries_the_agents_time() -> None:
    when = ARRIVED - timedelta(minutes=5)
    update = decode(presence_topic(DEVICE), presence_payload(online=True, when=when), arrived=ARRIVED)
    assert update == PresenceUpdate(device_id=DEVICE, online=True, time=when, reason="r", stamped=True)


def test_the_last_will_has_no_time_and_takes_its_arrival() -> None:
    update = decode_presence(
        presence_topic(DEVICE), presence_payload(online=False, when=None), arrived=ARRIVED
    )
    assert (update.online, update.time, update.stamped) == (False, ARRIVED, False)


def test_a_presence_from_the_future_counts_from_its_arrival() -> None:
    """A clock running ahead must not pin the device's presence: later ones would lose to it."""
    ahead = ARRIVED + timedelta(days=3)
    update = decode_presence(
        presence_topic(DEVICE), presence_payload(online=True, when=ahead), arrived=ARRIVED
    )
    assert update.time == ARRIVED


@pytest.mark.parametrize(
    ("topic", "payload", "reason"),
    [
        (
            presence_topic(DEVICE),
            presence_payload(online=True, when=None, device_id="dev-2"),
            RejectReason.DEVICE_MISMATCH,
        ),
        (presence_topic(DEVICE), b"[]", RejectReason.MALFORMED),
        (presence_topic(DEVICE), b'{"online": "maybe"}', RejectReason.MALFORMED),
        (
            "fleet/v1/devices/dev-1/telemetry/presence",
            presence_payload(online=True, when=None),
            RejectReason.BAD_TOPIC,
        ),
        ("fleet/v1/devices/dev-1/x/status", b"{}", RejectReason.BAD_TOPIC),
        (status_topic(DEVICE), b'{"deviceId": "dev-2"}', RejectReason.DEVICE_MISMATCH),
        (status_topic(DEVICE), b'{"deviceId": "dev-1", "state": 12345678901}', RejectReason.MALFORMED),
        (status_topic(DEVICE), b"null", RejectReason.MALFORMED),
    ],
)
def test_bad_presence_and_status_are_rejected(topic: str, payload: bytes, reason: RejectReason) -> None:
    rejected(reason, topic, payload)


def test_status_is_validated_and_only_its_time_is_kept() -> None:
    status = telemetry_pb2.DeviceStatus(
        schema_version=1, device_id=DEVICE, state=common_pb2.DEVICE_STATE_ACTIVE, api_url="http://x"
    )
    status.time.FromDatetime(ARRIVED - timedelta(seconds=1))
    update = decode_status(status_topic(DEVICE), encode_message(status), arrived=ARRIVED)
    assert update == StatusUpdate(device_id=DEVICE, time=ARRIVED - timedelta(seconds=1))


def test_an_empty_retained_payload_only_clears_and_stores_nothing() -> None:
    assert decode(presence_topic(DEVICE), b"", arrived=ARRIVED) is None
    assert decode(status_topic(DEVICE), b"", arrived=ARRIVED) is None


def test_decode_routes_by_topic() -> None:
    assert isinstance(decode(HEARTBEATS, array(heartbeat(1)), arrived=ARRIVED), TelemetryBatch)
    assert isinstance(decode(status_topic(DEVICE), b'{"deviceId": "dev-1"}', arrived=ARRIVED), StatusUpdate)


# replica ids ------------------------------------------------------------------------------------


def test_each_replica_gets_its_own_client_id() -> None:
    assert replica_client_id("cp-a") == "edgefleet-controlplane-cp-a"
    for bad in ("", "with space", "x" * 201, "tab\there"):
        with pytest.raises(ValueError, match="replica id"):
            replica_client_id(bad)


def inference(seq: int, **fields: Any) -> dict[str, Any]:
    return {"schemaVersion": 1, "deviceId": DEVICE, "seq": str(seq), "time": "2025-06-01T11:00:00Z", **fields}


@pytest.mark.parametrize(
    ("topic", "record"),
    [
        (INFERENCE, inference(1, errorsByCode={"queue_full": "lots"})),  # a map's 64-bit values
        (INFERENCE, inference(1, bundle={"name": "m", "version": "v2"})),  # a nested message's
        (INFERENCE, inference(1, windowStart="2025-06-01 11:00")),
        (INFERENCE, inference(1, latencyMsP95="fast")),
        (INFERENCE, inference(1, requests=True)),
        (INFERENCE, inference(1, requests="-")),
        (INFERENCE, inference(1, requests="1" * 21)),
        (
            HEARTBEATS,
            heartbeat(1, models=[{"bundle": {"name": "m", "version": "1"}}, {"bundle": {"version": "x"}}]),
        ),
        (HEARTBEATS, heartbeat(1, models={"bundle": {}})),
    ],
)
def test_every_integer_and_time_is_checked_however_deep(topic: str, record: dict[str, Any]) -> None:
    rejected(
        RejectReason.MALFORMED, topic, array(inference(2), record) if topic == INFERENCE else array(record)
    )


def test_the_error_names_the_bad_value() -> None:
    with pytest.raises(RejectedMessage, match="'lots'"):
        decode_message(INFERENCE, array(inference(1, errorsByCode={"queue_full": "lots"})))
    with pytest.raises(RejectedMessage, match=r"record 1: .*\$\.requests"):
        decode_message(INFERENCE, array(inference(1), inference(2, requests=[1])))


def test_nested_unknown_fields_are_dropped_and_numbers_kept_as_sent() -> None:
    [record] = decode_message(
        INFERENCE,
        array(
            inference(1, bundle={"name": "m", "version": "7", "future": 1}, requests=3, tokensPerSecond="NaN")
        ),
    ).records
    assert record.payload["bundle"] == {"name": "m", "version": "7"}
    assert (record.payload["requests"], record.payload["tokensPerSecond"]) == (3, "NaN")
    [beat] = decode_message(
        HEARTBEATS, array(heartbeat(1, models=[{"bundle": {"name": "m", "version": "2"}, "loaded": True}]))
    ).records
    assert beat.payload["models"] == [{"bundle": {"name": "m", "version": "2"}, "loaded": True}]
