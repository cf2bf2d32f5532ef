"""Decoding and checking one telemetry message: pure functions, no broker, no database.

Contract: ``decode`` turns a topic, a payload and its arrival time into something the store
can take (``TelemetryBatch``, ``PresenceUpdate``, ``StatusUpdate``), None for an empty retained
payload, or raises ``RejectedMessage`` whose ``reason`` says why it cannot be stored (the
dead-letter table and the counters are keyed by it). Nothing a device sends makes it raise
anything else: record-stream payloads are held to what the database can store by
``record_shape`` (integer ranges, finite numbers, string, map and list sizes); here the payload
bytes, the topic, the device id and its length, seq within BIGINT, and a record time more than
``MAX_CLOCK_SKEW`` ahead of its arrival clamped to the arrival. Safe on any thread (no state).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, TypeAlias

import msgspec
from google.protobuf import json_format
from google.protobuf.message import Message

from edgefleet.controlplane.store.telemetry import IngestRecord, PresenceUpdate, StatusUpdate
from edgefleet.controlplane.store.values import INT64_MAX
from edgefleet.controlplane.telemetry.record_shape import BadShape, ShapeProblem, decode_records
from edgefleet.protos.fleet.topics import (
    MESSAGE_TYPES,
    PRESENCE,
    STATUS,
    TopicError,
    device_of,
    parse_telemetry_topic,
)
from edgefleet.protos.fleet.v1 import telemetry_pb2

MAX_MESSAGE_BYTES = 256 * 1024
"""Longest payload stored: deploy/mosquitto's ``max_packet_size`` (and the embedded broker's)."""
MAX_CLOCK_SKEW = timedelta(minutes=5)
"""A record stamped further ahead of its arrival than this is stored at its arrival time."""
DEVICE_ID_MAX_CHARS = 64  # Device.id and TelemetryRecord.device_id are VARCHAR(64)


class RejectReason(enum.Enum):
    """Why a received message was not stored (it is in the dead-letter table under this name)."""

    BAD_TOPIC = "bad_topic"
    MALFORMED = "malformed"
    DEVICE_MISMATCH = "device_mismatch"
    OVERSIZED = "oversized"  # payload longer than MAX_MESSAGE_BYTES: refused before decoding
    TOO_MANY_RECORDS = "too_many_records"
    RECORD_TOO_LARGE = "record_too_large"
    OUT_OF_RANGE = "out_of_range"  # a well-formed number beyond its field's range: detail names it
    STORE_FAILED = "store_failed"  # the database refused it, alone
    INTERNAL_ERROR = "internal_error"  # the writer failed unexpectedly on its batch


_SHAPE_REASONS = {
    ShapeProblem.MALFORMED: RejectReason.MALFORMED,
    ShapeProblem.OUT_OF_RANGE: RejectReason.OUT_OF_RANGE,
    ShapeProblem.TOO_MANY_RECORDS: RejectReason.TOO_MANY_RECORDS,
    ShapeProblem.RECORD_TOO_LARGE: RejectReason.RECORD_TOO_LARGE,
}


class RejectedMessage(ValueError):
    """A message that cannot be stored; ``reason`` says why, the text says what exactly."""

    def __init__(self, reason: RejectReason, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class TelemetryBatch:
    """The records of one record-stream message, oldest first; ``clamped`` of them were stamped
    too far ahead and carry their arrival time instead."""

    records: tuple[IngestRecord, ...]
    clamped: int = 0


Decoded: TypeAlias = TelemetryBatch | PresenceUpdate | StatusUpdate


def decode(topic: str, payload: bytes | bytearray, *, arrived: datetime) -> Decoded | None:
    """Turns one MQTT message into something storable, or raises RejectedMessage. None: an
    empty presence or status payload, which only clears the retained message (nothing to store).
    ``arrived`` is when it was received."""
    if len(payload) > MAX_MESSAGE_BYTES:
        raise RejectedMessage(
            RejectReason.OVERSIZED, f"{len(payload)} bytes on {topic}, more than {MAX_MESSAGE_BYTES}"
        )
    if topic.endswith("/" + PRESENCE):
        return decode_presence(topic, payload, arrived=arrived) if payload else None
    if topic.endswith("/" + STATUS):
        return decode_status(topic, payload, arrived=arrived) if payload else None
    return decode_message(topic, payload, arrived=arrived)


def decode_message(
    topic: str, payload: bytes | bytearray, *, arrived: datetime | None = None
) -> TelemetryBatch:
    """Decodes a record-stream message: a non-empty JSON array of records of the topic's kind.

    One malformed element, or one claiming another device, rejects the whole message: a
    device's own agent never sends such a thing, so none of it can be trusted. The stored
    payload is each record's known fields as the agent wrote them (lowerCamelCase, each checked
    against the type protobuf's JSON mapping gives it by ``record_shape``); unknown fields,
    from a newer schema, are dropped. A record time more than MAX_CLOCK_SKEW after ``arrived``
    (default: now) is replaced by ``arrived``: a clock running ahead must not put rows in the
    future, where they would outlive retention and pin the device's last-seen time.
    """
    try:
        parsed = parse_telemetry_topic(topic)
    except TopicError as exc:
        raise RejectedMessage(RejectReason.BAD_TOPIC, str(exc)) from exc
    _check_device_id_length(parsed.device_id)
    kind = parsed.kind.value
    try:
        elements = decode_records(MESSAGE_TYPES[parsed.kind].DESCRIPTOR, payload)
    except BadShape as exc:
        raise RejectedMessage(_SHAPE_REASONS[exc.problem], f"{kind} payload on {topic}: {exc}") from exc
    if not elements:
        raise RejectedMessage(RejectReason.MALFORMED, f"{kind} payload on {topic}: an empty array")
    now = arrived if arrived is not None else datetime.now(UTC)
    latest = now + MAX_CLOCK_SKEW
    records = []
    clamped = 0
    for index, body in enumerate(elements):  # runs for every record the fleet sends: kept lean
        try:
            record = _record(kind, parsed.device_id, body, now)
        except RejectedMessage as exc:
            raise RejectedMessage(exc.reason, f"{kind} record {index} on {topic}: {exc}") from exc
        if record.time > latest:
            record = IngestRecord(record.device_id, record.kind, record.seq, now, record.payload)
            clamped += 1
        records.append(record)
    return TelemetryBatch(tuple(records), clamped)


def decode_presence(topic: str, payload: bytes | bytearray, *, arrived: datetime) -> PresenceUpdate:
    """Decodes a retained Presence. Its time is the agent's stamp (never later than its arrival:
    a clock running ahead must not pin a device's presence in the future), or the arrival time
    for the Last Will, which carries none."""
    device_id = _device_of(topic, PRESENCE)
    message = telemetry_pb2.Presence()
    _parse_object(message, payload, f"presence on {topic}")
    _check_device(message.device_id, device_id)
    stamped = message.HasField("time")
    when = min(_time(message, topic), arrived) if stamped else arrived
    return PresenceUpdate(
        device_id=device_id, online=message.online, time=when, reason=message.reason, stamped=stamped
    )


def decode_status(topic: str, payload: bytes | bytearray, *, arrived: datetime) -> StatusUpdate:
    """Decodes a retained DeviceStatus: validated and counted; only its time is used."""
    device_id = _device_of(topic, STATUS)
    message = telemetry_pb2.DeviceStatus()
    _parse_object(message, payload, f"status on {topic}")
    _check_device(message.device_id, device_id)
    when = min(_time(message, topic), arrived) if message.HasField("time") else None
    return StatusUpdate(device_id=device_id, time=when)


def _json(payload: bytes | bytearray, where: str) -> Any:
    try:
        return msgspec.json.decode(payload)
    except (msgspec.DecodeError, RecursionError) as exc:  # invalid UTF-8 included
        raise RejectedMessage(RejectReason.MALFORMED, f"{where}: {exc}") from exc


def _parse_object(message: Message, payload: bytes | bytearray, where: str) -> None:
    value = _json(payload, where)
    if not isinstance(value, dict):
        raise RejectedMessage(RejectReason.MALFORMED, f"{where}: not a JSON object")
    try:
        json_format.ParseDict(value, message, ignore_unknown_fields=True)
    except (json_format.ParseError, ValueError, RecursionError) as exc:
        raise RejectedMessage(RejectReason.MALFORMED, f"{where}: {exc}") from exc


def _record(kind: str, device_id: str, body: dict[str, Any], arrived: datetime) -> IngestRecord:
    """One record, already checked against its message type, with its identity fields parsed
    strictly."""
    _check_device(str(body.get("deviceId", "")), device_id)
    seq = int(body.get("seq", 0))
    if seq <= 0:
        raise RejectedMessage(RejectReason.MALFORMED, "no seq")
    if seq > INT64_MAX:  # record_shape bounds uint64 already; the column is what matters here
        raise RejectedMessage(RejectReason.OUT_OF_RANGE, f"seq {seq} does not fit a signed 64-bit integer")
    stamp = body.get("time")
    when = _parse_time(stamp) if stamp is not None else arrived
    return IngestRecord(device_id=device_id, kind=kind, seq=seq, time=when, payload=body)


def _parse_time(stamp: str) -> datetime:
    """A record's RFC 3339 time (already shape-checked) as an aware UTC datetime; nanoseconds
    beyond the microsecond are dropped, as protobuf's own ToDatetime does."""
    try:
        return datetime.fromisoformat(stamp).astimezone(UTC)
    except (ValueError, OverflowError) as exc:
        raise RejectedMessage(RejectReason.MALFORMED, f"bad time: {exc}") from exc


def _device_of(topic: str, leaf: str) -> str:
    try:
        device_id = device_of(topic, leaf)
    except TopicError as exc:
        raise RejectedMessage(RejectReason.BAD_TOPIC, str(exc)) from exc
    return _check_device_id_length(device_id)


def _check_device_id_length(device_id: str) -> str:
    if len(device_id) > DEVICE_ID_MAX_CHARS:
        raise RejectedMessage(
            RejectReason.BAD_TOPIC,
            f"a device id of {len(device_id)} characters, more than {DEVICE_ID_MAX_CHARS}",
        )
    return device_id


def _check_device(claimed: str, device_id: str) -> None:
    if claimed != device_id:
        raise RejectedMessage(
            RejectReason.DEVICE_MISMATCH, f"message for device {claimed!r} published on {device_id!r}'s topic"
        )


def _time(message: Any, topic: str) -> datetime:
    try:
        when: datetime = message.time.ToDatetime(tzinfo=UTC)
    except (ValueError, OverflowError) as exc:
        raise RejectedMessage(RejectReason.MALFORMED, f"bad time on {topic}: {exc}") from exc
    return when
