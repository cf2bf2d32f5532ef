"""The committed telemetry JSON Schemas are what protos/schemas.py generates now, and real
messages, encoded the way the agent encodes them, validate against them."""

from __future__ import annotations

import copy
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message

from edgefleet.agent.telemetry.outbox import encode_batch, encode_message
from edgefleet.protos import schemas
from edgefleet.protos.fleet.topics import MESSAGE_TYPES, TopicKind
from edgefleet.protos.fleet.v1 import common_pb2, telemetry_pb2

BY_NAME: dict[str, type[Message]] = {
    **{kind.value: cls for kind, cls in MESSAGE_TYPES.items()},
    "presence": telemetry_pb2.Presence,
    "status": telemetry_pb2.DeviceStatus,
}
WHEN = datetime(2026, 5, 17, 8, 30, 12, 250_000, tzinfo=UTC)


def test_committed_schemas_match_the_proto(tmp_path: Path) -> None:
    fresh = schemas.write(tmp_path)
    assert {p.name for p in fresh} == {f"{name}.schema.json" for name in BY_NAME}
    for path in fresh:
        committed = schemas.SCHEMA_DIR / path.name
        assert committed.exists(), (
            f"{path.name} is generated but not committed: run python -m edgefleet.protos.schemas"
        )
        assert committed.read_bytes() == path.read_bytes(), (
            f"{path.name} is stale: run python -m edgefleet.protos.schemas"
        )
    stale = {p.name for p in schemas.SCHEMA_DIR.glob("*.schema.json")} - {p.name for p in fresh}
    assert not stale, f"schemas without a payload: {stale}"


def test_write_removes_schemas_no_topic_carries(tmp_path: Path) -> None:
    (tmp_path / "inferencerecord.schema.json").write_text("{}")
    (tmp_path / "notes.md").write_text("kept")
    schemas.write(tmp_path)
    assert not (tmp_path / "inferencerecord.schema.json").exists()
    assert (tmp_path / "notes.md").exists()


def load(name: str) -> dict[str, Any]:
    schema: dict[str, Any] = json.loads((schemas.SCHEMA_DIR / f"{name}.schema.json").read_text())
    return schema


def validator(schema: dict[str, Any]) -> jsonschema.Draft202012Validator:
    return jsonschema.Draft202012Validator(
        schema, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER
    )


def closed(schema: Any) -> Any:
    """The schema with every message closed to properties it does not name: validating against
    it proves the schema lists every field the encoder writes (maps stay open by nature)."""
    if isinstance(schema, dict):
        out = {key: closed(value) for key, value in schema.items()}
        if "properties" in schema:
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [closed(item) for item in schema]
    return schema


def _value(field: FieldDescriptor, depth: int) -> Any:
    if field.type == FieldDescriptor.TYPE_ENUM:
        return field.enum_type.values[-1].number
    if field.type == FieldDescriptor.TYPE_STRING:
        return f"{field.name}-x"
    if field.type == FieldDescriptor.TYPE_BYTES:
        return b"\x00\xff"
    if field.type == FieldDescriptor.TYPE_BOOL:
        return True
    if field.type in (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT):
        return 12.5
    if field.type in (FieldDescriptor.TYPE_UINT64, FieldDescriptor.TYPE_FIXED64):
        return 2**64 - 1  # the largest, to be sure the pattern takes 20 digits
    if field.type in (FieldDescriptor.TYPE_INT64, FieldDescriptor.TYPE_SINT64, FieldDescriptor.TYPE_SFIXED64):
        return -(2**63)
    return 7


def fill(message: Message, depth: int = 0) -> Message:
    """Sets every field of ``message`` (recursively) to a non-default value, so a field added
    to the .proto is covered here without editing this test."""
    descriptor: Descriptor = message.DESCRIPTOR
    for field in descriptor.fields:
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            key_field, value_field = field.message_type.fields
            key = _value(key_field, depth)
            target = getattr(message, field.name)
            if value_field.message_type is not None:
                fill(target[key], depth + 1)
            else:
                target[key] = _value(value_field, depth)
        elif field.message_type is not None:
            if field.message_type.full_name == "google.protobuf.Timestamp":
                items = [getattr(message, field.name)]
                if field.is_repeated:
                    items = [getattr(message, field.name).add() for _ in range(2)]
                for item in items:
                    item.FromDatetime(WHEN)
            elif depth < 4:
                if field.is_repeated:
                    for _ in range(2):
                        fill(getattr(message, field.name).add(), depth + 1)
                else:
                    fill(getattr(message, field.name), depth + 1)
        elif field.is_repeated:
            getattr(message, field.name).extend([_value(field, depth)] * 2)
        else:
            setattr(message, field.name, _value(field, depth))
    return message


def encoded(message: Message) -> Any:
    return json.loads(encode_message(message))


def payload(name: str, *messages: Message) -> Any:
    """What the agent publishes: a batch (encode_batch) on a record stream, one object else."""
    if name in {k.value for k in TopicKind}:
        return json.loads(encode_batch([encode_message(m) for m in messages]))
    (message,) = messages
    return encoded(message)


@pytest.mark.parametrize("name", sorted(BY_NAME))
def test_schemas_are_valid_2020_12(name: str) -> None:
    jsonschema.Draft202012Validator.check_schema(load(name))


@pytest.mark.parametrize("name", sorted(BY_NAME))
def test_every_field_set_validates_against_the_closed_schema(name: str) -> None:
    batch = name in {k.value for k in TopicKind}
    doc = payload(name, *[fill(BY_NAME[name]()) for _ in range(2 if batch else 1)])
    validator(load(name)).validate(doc)
    validator(closed(load(name))).validate(doc)


@pytest.mark.parametrize("name", sorted(BY_NAME))
def test_a_default_message_validates_and_writes_exactly_the_required_fields(name: str) -> None:
    """encode_message writes every field without presence: the schema's ``required``."""
    message = BY_NAME[name]()
    validator(load(name)).validate(payload(name, message))
    definition = load(name)["$defs"][message.DESCRIPTOR.full_name]
    assert sorted(encoded(message)) == sorted(definition["required"])


def test_realistic_records_validate() -> None:
    inference = telemetry_pb2.InferenceSummary(
        schema_version=telemetry_pb2.TELEMETRY_SCHEMA_V1,
        device_id="dev-1",
        seq=41,
        model="smollm2",
        bundle=common_pb2.BundleRef(name="smollm2", version=3),
        variant="gguf-q4_0",
        requests=12,
        errors=1,
        errors_by_code={"queue_full": 1},
        requests_by_endpoint={"chat.completions": 11, "embeddings": 1},
        prompt_tokens=900,
        completion_tokens=1500,
        latency_ms_p50=210.5,
        latency_ms_p95=480.0,
        latency_ms_max=512.25,
        tokens_per_second=float("nan"),  # no successful generation: the encoder writes "NaN"
    )
    inference.time.FromDatetime(WHEN)
    inference.window_start.FromDatetime(WHEN.replace(second=0))
    heartbeat = telemetry_pb2.Heartbeat(
        schema_version=1,
        device_id="dev-1",
        seq=42,
        state=common_pb2.DEVICE_STATE_ACTIVE,
        requests_total=12,
        models=[common_pb2.InstalledModel(bundle=common_pb2.BundleRef(name="smollm2", version=3))],
    )
    heartbeat.time.GetCurrentTime()  # nanosecond precision: 9 fractional digits at times
    will = telemetry_pb2.Presence(schema_version=1, device_id="dev-1", online=False, reason="connection lost")

    validator(load("inference")).validate(payload("inference", inference, inference))
    validator(load("heartbeat")).validate(payload("heartbeat", heartbeat))
    validator(load("presence")).validate(payload("presence", will))
    doc = encoded(inference)
    assert doc["seq"] == "41" and doc["errorsByCode"] == {"queue_full": "1"}  # 64-bit: strings


def errors(name: str, doc: Any) -> list[str]:
    return [e.message for e in validator(load(name)).iter_errors(doc)]


def test_schemas_refuse_what_the_contract_does_not_send() -> None:
    record = encoded(fill(telemetry_pb2.Heartbeat()))
    assert errors("heartbeat", record), "a record stream is an array, never a bare record"
    assert errors("heartbeat", []), "a batch holds at least one record"
    wrong_enum = copy.deepcopy(record) | {"state": "DEVICE_STATE_SLEEPING"}
    assert errors("heartbeat", [wrong_enum])
    number_seq = copy.deepcopy(record) | {"seq": 42}  # the encoder writes 64-bit integers as strings
    assert errors("heartbeat", [number_seq])
    local_time = copy.deepcopy(record) | {"time": "2026-05-17T08:30:12+02:00"}  # always UTC "Z"
    assert errors("heartbeat", [local_time])
    missing = {k: v for k, v in record.items() if k != "deviceId"}
    assert errors("heartbeat", [missing])
    status = encoded(fill(telemetry_pb2.DeviceStatus()))
    assert errors("status", [status]), "presence and status are single objects"
    assert not errors("status", status | {"fieldFromANewerAgent": 1}), "readers ignore unknown fields"


def test_the_documented_example_is_a_valid_inference_batch() -> None:
    """docs/telemetry.md shows a whole inference batch: it must stay exactly what the schema says."""
    text = (schemas.REPO_ROOT / "docs" / "telemetry.md").read_text()
    example = text.split("```json\n", 1)[1].split("```", 1)[0]
    doc = json.loads(example)
    validator(closed(load("inference"))).validate(doc)
    required = load("inference")["$defs"]["fleet.v1.InferenceSummary"]["required"]
    assert set(required) <= set(doc[0]), "the example shows every field the encoder writes"
