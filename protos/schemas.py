"""Generates the JSON Schemas of the telemetry payloads from protos/fleet/v1/telemetry.proto.

Run from anywhere as ``python -m edgefleet.protos.schemas``; it writes one schema per topic payload to
``docs/telemetry/schemas/`` (removing schemas no topic carries any more), and
``tests/unit/test_schemas.py`` regenerates them and fails if the committed files differ, as
``edgefleet.protos.generate`` does for the Python code.

Why a generator of our own: PyPI has no maintained protobuf-to-JSON-Schema generator (the
well-known one, protoc-gen-jsonschema, is a Go plugin), and the schemas must describe exactly
what ``edgefleet.agent.telemetry.outbox.encode_message`` writes, which is narrower than everything
protobuf's JSON mapping accepts on input:

- field names are lowerCamelCase (the descriptor's ``json_name``);
- every field without presence (scalars, enums, repeated fields, maps) is always written, so
  those are ``required``; message fields (a Timestamp, a BundleRef) are written only when set;
- 64-bit integers are decimal strings (parsers also accept JSON numbers; the writer never
  sends one), 32-bit integers are numbers;
- doubles and floats are numbers, or the strings "NaN", "Infinity", "-Infinity";
- enums are their value names; Timestamps are RFC 3339 strings in UTC ("Z");
- maps are JSON objects; nested messages are ``$defs`` entries, referenced by full name.

Unknown properties are allowed: the contract says readers ignore fields a newer agent adds.
Descriptions come from the .proto comments, read from protoc's source info.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from google.protobuf import descriptor_pb2
from grpc_tools import protoc

from edgefleet.protos.fleet.topics import (
    MESSAGE_TYPES,
    TopicKind,
    presence_topic,
    status_topic,
    telemetry_topic,
)
from edgefleet.protos.fleet.v1 import telemetry_pb2
from edgefleet.protos.generate import PROTO_DIR, REPO_ROOT, ProtocError

SCHEMA_DIR = REPO_ROOT / "docs" / "telemetry" / "schemas"
TELEMETRY_PROTO = PROTO_DIR / "telemetry.proto"
DIALECT = "https://json-schema.org/draft/2020-12/schema"
SUFFIX = ".schema.json"
DEVICE_PLACEHOLDER = "{device_id}"

Schema = dict[str, Any]
FieldProto = descriptor_pb2.FieldDescriptorProto

# Paths into a FileDescriptorProto, as SourceCodeInfo locations name them (descriptor.proto).
_FILE_MESSAGE, _FILE_ENUM = 4, 5
_MESSAGE_FIELD, _MESSAGE_NESTED, _MESSAGE_ENUM = 2, 3, 4
_ENUM_VALUE = 2

_INT32 = {FieldProto.TYPE_INT32, FieldProto.TYPE_SINT32, FieldProto.TYPE_SFIXED32}
_UINT32 = {FieldProto.TYPE_UINT32, FieldProto.TYPE_FIXED32}
_INT64 = {FieldProto.TYPE_INT64, FieldProto.TYPE_SINT64, FieldProto.TYPE_SFIXED64}
_UINT64 = {FieldProto.TYPE_UINT64, FieldProto.TYPE_FIXED64}
_FLOATS = {FieldProto.TYPE_DOUBLE, FieldProto.TYPE_FLOAT}

_TIMESTAMP_PATTERN = (
    r"^[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]{3}|\.[0-9]{6}|\.[0-9]{9})?Z$"
)
_WELL_KNOWN: dict[str, Schema] = {
    ".google.protobuf.Timestamp": {
        "type": "string",
        "format": "date-time",
        "pattern": _TIMESTAMP_PATTERN,
        "description": "A point in time, RFC 3339 in UTC with 0, 3, 6 or 9 fractional digits.",
    },
    ".google.protobuf.Duration": {
        "type": "string",
        "pattern": r"^-?[0-9]+(\.[0-9]{3}|\.[0-9]{6}|\.[0-9]{9})?s$",
        "description": "A duration in seconds with an 's' suffix, e.g. \"1.5s\".",
    },
}


class SchemaError(ValueError):
    """The .proto uses something this generator cannot express (yet)."""


@dataclass(frozen=True, slots=True)
class Payload:
    """One topic's payload: which message, on which topic, alone or as a batch (array)."""

    name: str  # file stem, the topic's last level
    message: str  # full protobuf name, e.g. "fleet.v1.Heartbeat"
    topic: str  # with {device_id} standing for the device's id
    batch: bool
    summary: str

    @property
    def file_name(self) -> str:
        return self.name + SUFFIX


def payloads() -> tuple[Payload, ...]:
    """Every payload a device publishes, named after its topic; built from edgefleet.protos.fleet.topics
    so a new stream or a changed record type shows up here without a second list to edit."""
    streams = tuple(
        Payload(
            name=kind.value,
            message=MESSAGE_TYPES[kind].DESCRIPTOR.full_name,
            topic=telemetry_topic(DEVICE_PLACEHOLDER, kind),
            batch=True,
            summary=(
                f"The payload of {telemetry_topic(DEVICE_PLACEHOLDER, kind)}: a JSON array of one or "
                "more records, oldest first. Deduplicate by (deviceId, seq)."
            ),
        )
        for kind in TopicKind
    )
    retained = (
        Payload(
            name="presence",
            message=telemetry_pb2.Presence.DESCRIPTOR.full_name,
            topic=presence_topic(DEVICE_PLACEHOLDER),
            batch=False,
            summary=f"The retained payload of {presence_topic(DEVICE_PLACEHOLDER)}: one JSON object.",
        ),
        Payload(
            name="status",
            message=telemetry_pb2.DeviceStatus.DESCRIPTOR.full_name,
            topic=status_topic(DEVICE_PLACEHOLDER),
            batch=False,
            summary=f"The retained payload of {status_topic(DEVICE_PLACEHOLDER)}: one JSON object.",
        ),
    )
    return streams + retained


def load_descriptors(proto: Path = TELEMETRY_PROTO) -> descriptor_pb2.FileDescriptorSet:
    """``proto`` and everything it imports, parsed by protoc with comments (source info)."""
    well_known = resources.files("grpc_tools") / "_proto"
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "descriptors.pb"
        args = [
            "grpc_tools.protoc",
            f"-I{REPO_ROOT}",
            f"-I{well_known}",
            "--include_imports",
            "--include_source_info",
            f"--descriptor_set_out={out}",
            str(proto.relative_to(REPO_ROOT)),
        ]
        if protoc.main(args) != 0:
            raise ProtocError(f"protoc failed for {proto}")
        return descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())


def _paragraphs(text: str) -> str:
    """A protobuf comment as prose: lines of a paragraph joined, paragraphs kept apart."""
    blocks: list[list[str]] = [[]]
    for line in text.strip().splitlines():
        if line.strip():
            blocks[-1].append(line.strip())
        elif blocks[-1]:
            blocks.append([])
    return "\n\n".join(" ".join(block) for block in blocks if block)


@dataclass(frozen=True, slots=True)
class _Message:
    proto: descriptor_pb2.DescriptorProto
    comment: str
    field_comments: dict[str, str]


@dataclass(frozen=True, slots=True)
class _Enum:
    proto: descriptor_pb2.EnumDescriptorProto
    comment: str
    value_comments: dict[str, str]


class _Index:
    """Every message and enum of a descriptor set by full name (".fleet.v1.Heartbeat"), with
    the comments protoc attached to it, its fields and its values."""

    def __init__(self, descriptors: descriptor_pb2.FileDescriptorSet) -> None:
        self.messages: dict[str, _Message] = {}
        self.enums: dict[str, _Enum] = {}
        for file in descriptors.file:
            comments = {
                tuple(loc.path): _paragraphs(
                    "\n\n".join(c for c in (loc.leading_comments, loc.trailing_comments) if c)
                )
                for loc in file.source_code_info.location
            }
            scope = f".{file.package}" if file.package else ""
            for i, message in enumerate(file.message_type):
                self._add_message(message, scope, (_FILE_MESSAGE, i), comments)
            for i, enum in enumerate(file.enum_type):
                self._add_enum(enum, scope, (_FILE_ENUM, i), comments)

    def _add_message(
        self,
        message: descriptor_pb2.DescriptorProto,
        scope: str,
        path: tuple[int, ...],
        comments: dict[tuple[int, ...], str],
    ) -> None:
        name = f"{scope}.{message.name}"
        self.messages[name] = _Message(
            proto=message,
            comment=comments.get(path, ""),
            field_comments={
                f.name: comments.get((*path, _MESSAGE_FIELD, i), "") for i, f in enumerate(message.field)
            },
        )
        for i, nested in enumerate(message.nested_type):
            self._add_message(nested, name, (*path, _MESSAGE_NESTED, i), comments)
        for i, enum in enumerate(message.enum_type):
            self._add_enum(enum, name, (*path, _MESSAGE_ENUM, i), comments)

    def _add_enum(
        self,
        enum: descriptor_pb2.EnumDescriptorProto,
        scope: str,
        path: tuple[int, ...],
        comments: dict[tuple[int, ...], str],
    ) -> None:
        self.enums[f"{scope}.{enum.name}"] = _Enum(
            proto=enum,
            comment=comments.get(path, ""),
            value_comments={
                v.name: comments.get((*path, _ENUM_VALUE, i), "") for i, v in enumerate(enum.value)
            },
        )


def _def_name(type_name: str) -> str:
    return type_name.lstrip(".")


def _ref(type_name: str) -> Schema:
    return {"$ref": f"#/$defs/{_def_name(type_name)}"}


def _described(schema: Schema, description: str) -> Schema:
    return {**schema, "description": description} if description else schema


def _always_written(field: FieldProto) -> bool:
    """encode_message prints every field without presence, default or not; it omits unset
    singular messages, oneof members and proto3 ``optional`` fields (whose presence is tracked)."""
    if field.label == FieldProto.LABEL_REPEATED:
        return True
    return field.type != FieldProto.TYPE_MESSAGE and not field.HasField("oneof_index")


class _Builder:
    """Turns messages into JSON Schema, collecting every referenced type in ``defs``."""

    def __init__(self, index: _Index) -> None:
        self.index = index
        self.defs: dict[str, Schema] = {}

    def reference(self, type_name: str) -> Schema:
        name = _def_name(type_name)
        if name not in self.defs:
            self.defs[name] = {}  # reserved first: a message may refer to itself
            self.defs[name] = self._definition(type_name)
        return _ref(type_name)

    def _definition(self, type_name: str) -> Schema:
        if type_name in _WELL_KNOWN:
            return dict(_WELL_KNOWN[type_name])
        if type_name in self.index.enums:
            return self._enum(self.index.enums[type_name])
        if type_name.startswith(".google.protobuf."):
            raise SchemaError(f"{type_name} has a special JSON form this generator does not know yet")
        if type_name not in self.index.messages:
            raise SchemaError(f"unknown type {type_name}")
        return self._message(self.index.messages[type_name])

    def _enum(self, enum: _Enum) -> Schema:
        names = [v.name for v in enum.proto.value]
        lines = [f"{name}: {enum.value_comments[name]}" for name in names if enum.value_comments[name]]
        description = "\n\n".join(part for part in (enum.comment, "\n".join(lines)) if part)
        return _described({"title": enum.proto.name, "type": "string", "enum": names}, description)

    def _message(self, message: _Message) -> Schema:
        properties: Schema = {}
        required: list[str] = []
        for field in message.proto.field:
            properties[field.json_name] = _described(
                self._field(message.proto, field), message.field_comments[field.name]
            )
            if _always_written(field):
                required.append(field.json_name)
        schema: Schema = {"title": message.proto.name, "type": "object"}
        if message.comment:
            schema["description"] = message.comment
        schema["properties"] = properties
        schema["required"] = required
        return schema

    def _field(self, owner: descriptor_pb2.DescriptorProto, field: FieldProto) -> Schema:
        if field.label == FieldProto.LABEL_REPEATED:
            entry = self._map_entry(owner, field)
            if entry is not None:
                key, value = entry.field
                return {"type": "object", **self._map_keys(key), "additionalProperties": self._single(value)}
            return {"type": "array", "items": self._single(field)}
        return self._single(field)

    def _map_entry(
        self, owner: descriptor_pb2.DescriptorProto, field: FieldProto
    ) -> descriptor_pb2.DescriptorProto | None:
        if field.type != FieldProto.TYPE_MESSAGE:
            return None
        leaf = field.type_name.rsplit(".", 1)[-1]
        for nested in owner.nested_type:
            if nested.name == leaf and nested.options.map_entry:
                return nested
        return None

    @staticmethod
    def _map_keys(key: FieldProto) -> Schema:
        """JSON object keys are strings; integer and bool keys are written as their text."""
        if key.type in _INT32 | _INT64:
            return {"propertyNames": {"pattern": "^(0|-?[1-9][0-9]*)$"}}
        if key.type in _UINT32 | _UINT64:
            return {"propertyNames": {"pattern": "^(0|[1-9][0-9]*)$"}}
        if key.type == FieldProto.TYPE_BOOL:
            return {"propertyNames": {"enum": ["true", "false"]}}
        return {}

    def _single(self, field: FieldProto) -> Schema:
        kind = field.type
        if kind in (FieldProto.TYPE_MESSAGE, FieldProto.TYPE_ENUM):
            return self.reference(field.type_name)
        if kind == FieldProto.TYPE_STRING:
            return {"type": "string"}
        if kind == FieldProto.TYPE_BYTES:
            return {"type": "string", "contentEncoding": "base64"}
        if kind == FieldProto.TYPE_BOOL:
            return {"type": "boolean"}
        if kind in _INT32:
            return {"type": "integer", "minimum": -(2**31), "maximum": 2**31 - 1}
        if kind in _UINT32:
            return {"type": "integer", "minimum": 0, "maximum": 2**32 - 1}
        if kind in _INT64:
            return {"type": "string", "pattern": "^(0|-?[1-9][0-9]{0,18})$"}
        if kind in _UINT64:
            return {"type": "string", "pattern": "^(0|[1-9][0-9]{0,19})$"}
        if kind in _FLOATS:
            return {"anyOf": [{"type": "number"}, {"enum": ["NaN", "Infinity", "-Infinity"]}]}
        raise SchemaError(f"field {field.name}: unsupported type {FieldProto.Type.Name(kind)}")


def payload_schema(payload: Payload, index: _Index) -> Schema:
    """The complete, self-contained schema of one topic's payload."""
    builder = _Builder(index)
    record = builder.reference(f".{payload.message}")
    message = index.messages[f".{payload.message}"]
    schema: Schema = {
        "$schema": DIALECT,
        "$comment": (
            "Generated by `python -m edgefleet.protos.schemas` from "
            f"{TELEMETRY_PROTO.relative_to(REPO_ROOT)} "
            f"({payload.message}); do not edit."
        ),
        "title": f"{payload.message.rsplit('.', 1)[-1]}{' batch' if payload.batch else ''}",
        "description": "\n\n".join(part for part in (payload.summary, message.comment) if part),
    }
    if payload.batch:
        schema.update({"type": "array", "minItems": 1, "items": record})
    else:
        schema.update(record)
    schema["$defs"] = dict(sorted(builder.defs.items()))
    return schema


def render(descriptors: descriptor_pb2.FileDescriptorSet | None = None) -> dict[str, str]:
    """File name -> file text of every payload schema (stable: same sources, same bytes)."""
    index = _Index(descriptors if descriptors is not None else load_descriptors())
    return {
        p.file_name: json.dumps(payload_schema(p, index), indent=2, ensure_ascii=False) + "\n"
        for p in payloads()
    }


def write(out_dir: Path = SCHEMA_DIR) -> list[Path]:
    """Writes every schema under ``out_dir`` and removes ``*.schema.json`` files no payload has."""
    out_dir.mkdir(parents=True, exist_ok=True)
    texts = render()
    for stale in _existing(out_dir):
        if stale.name not in texts:
            stale.unlink()
    written = []
    for name, text in texts.items():
        path = out_dir / name
        path.write_text(text, encoding="utf-8")
        written.append(path)
    return written


def _existing(out_dir: Path) -> Iterator[Path]:
    return (p for p in sorted(out_dir.glob(f"*{SUFFIX}")) if p.is_file())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument(
        "--out", type=Path, default=SCHEMA_DIR, help="output directory (default: %(default)s)"
    )
    args = parser.parse_args(argv)
    for path in write(args.out):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
