"""Decodes telemetry records and checks them against their protobuf messages, fast.

Ingestion sees every record the fleet produces. protobuf's ``json_format`` (pure Python) costs
about 100 µs a record, which caps a control plane at a few thousand records a second. Instead,
each message type gets a msgspec Struct derived from its descriptor, once: msgspec parses a
record-stream payload (a JSON array) and checks every field's JSON type in one C pass, dropping
unknown fields (a newer agent's), so stored payloads keep one shape per schema. The types are
those of protobuf's JSON mapping: 64-bit integers as numbers or digit strings, doubles as
numbers or "NaN"/"Infinity", enums as names or numbers, Timestamps as RFC 3339 strings, maps as
objects, repeated fields as lists, nested messages checked the same way.

Digit strings and timestamps are checked after the C pass, only where such a string occurs: a
msgspec pattern constraint calls back into Python's regex engine for each value, which cost
more than the whole parse.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from functools import cache
from operator import attrgetter
from typing import Any, Literal

import msgspec
from google.protobuf.descriptor import Descriptor, FieldDescriptor

_INT_TYPES = frozenset(
    {
        FieldDescriptor.TYPE_INT32,
        FieldDescriptor.TYPE_INT64,
        FieldDescriptor.TYPE_UINT32,
        FieldDescriptor.TYPE_UINT64,
        FieldDescriptor.TYPE_SINT32,
        FieldDescriptor.TYPE_SINT64,
        FieldDescriptor.TYPE_FIXED32,
        FieldDescriptor.TYPE_FIXED64,
        FieldDescriptor.TYPE_SFIXED32,
        FieldDescriptor.TYPE_SFIXED64,
    }
)
_DOUBLE = float | Literal["NaN", "Infinity", "-Infinity"]


class BadShape(ValueError):
    """A payload that is not a JSON array of records of its message; the text says where."""


def _is_timestamp(field: FieldDescriptor | Any) -> bool:
    return field.message_type is not None and field.message_type.full_name == "google.protobuf.Timestamp"


def _is_map(field: FieldDescriptor | Any) -> bool:
    return field.message_type is not None and bool(field.message_type.GetOptions().map_entry)


def _map_value(field: Any) -> Any:
    """The value field of a map field's entry message."""
    return field.message_type.fields_by_name["value"]


# the C pass: msgspec types ----------------------------------------------------------------------


def _scalar_type(field: FieldDescriptor | Any) -> Any:
    if field.type in _INT_TYPES:
        return int | str
    if field.type in (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT):
        return _DOUBLE
    if field.type == FieldDescriptor.TYPE_BOOL:
        return bool
    if field.type == FieldDescriptor.TYPE_ENUM:
        return int | str
    if field.type in (FieldDescriptor.TYPE_STRING, FieldDescriptor.TYPE_BYTES) or _is_timestamp(field):
        return str
    assert field.message_type is not None, f"{field.full_name}: a field of an unknown type"
    return struct_of(field.message_type)


def _field_type(field: FieldDescriptor | Any) -> Any:
    if _is_map(field):
        return dict[str, _scalar_type(_map_value(field))]  # type: ignore[misc]
    scalar = _scalar_type(field)
    return list[scalar] if field.is_repeated else scalar  # type: ignore[valid-type]


@cache
def struct_of(descriptor: Descriptor | Any) -> type[msgspec.Struct]:
    """The msgspec Struct of a message: its JSON field names, each optional (UNSET when absent,
    and then left out of the stored record)."""
    fields = [(f.json_name, _field_type(f) | msgspec.UnsetType, msgspec.UNSET) for f in descriptor.fields]
    return msgspec.defstruct(descriptor.name, fields)


@cache
def _decoder(descriptor: Descriptor | Any) -> msgspec.json.Decoder[Any]:
    return msgspec.json.Decoder(list[struct_of(descriptor)])  # type: ignore[misc]


# the Python pass: strings the C pass cannot judge ---------------------------------------------

Collect = Callable[[Any, list[Any], list[Any]], None]  # (struct, integers, timestamps)

# One regular expression over all of a payload's digit strings (or timestamps) joined by spaces:
# one C call per payload instead of one per value.
_INTEGERS = re.compile(r"-?\d{1,20}(?: -?\d{1,20})*", re.ASCII).fullmatch
_TIMESTAMP = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d{1,9})?(?:Z|[+-]\d\d:\d\d)"
_TIMESTAMPS = re.compile(f"{_TIMESTAMP}(?: {_TIMESTAMP})*", re.ASCII).fullmatch


def _tuple_getter(names: list[str]) -> Callable[[Any], tuple[Any, ...]]:
    """attrgetter that always returns a tuple (attrgetter of one name returns the value)."""
    if len(names) == 1:
        name = names[0]
        return lambda struct: (getattr(struct, name),)
    return attrgetter(*names)


@cache
def _collector(descriptor: Descriptor | Any) -> Collect | None:
    """A function that appends a struct's integer values (digit strings among them) and its
    timestamps, nested messages', maps' and lists' included, to the two lists it is given;
    None for a message that holds neither at any depth."""
    integers = [f.json_name for f in descriptor.fields if f.type in _INT_TYPES and not f.is_repeated]
    stamps = [f.json_name for f in descriptor.fields if _is_timestamp(f) and not f.is_repeated]
    deep: list[Collect] = [c for f in descriptor.fields if (c := _deep_collector(f)) is not None]
    if not (integers or stamps or deep):
        return None
    get_integers = _tuple_getter(integers) if integers else None
    get_stamps = _tuple_getter(stamps) if stamps else None

    def collect(struct: Any, ints: list[Any], times: list[Any]) -> None:
        if get_integers is not None:
            ints.extend(get_integers(struct))
        if get_stamps is not None:
            times.extend(get_stamps(struct))
        for more in deep:
            more(struct, ints, times)

    return collect


def _deep_collector(field: FieldDescriptor | Any) -> Collect | None:
    """The collector of a map, repeated or message field whose values hold integers or
    timestamps; None for any other field."""
    name = field.json_name
    item = _map_value(field) if _is_map(field) else field
    many = _is_map(field) or field.is_repeated
    if item.type in _INT_TYPES or _is_timestamp(item):
        if not many:
            return None  # a scalar: collected by attribute with the others
        target = 0 if item.type in _INT_TYPES else 1

        def scalars(struct: Any, ints: list[Any], times: list[Any]) -> None:
            value = getattr(struct, name)
            if value is not msgspec.UNSET:
                (ints, times)[target].extend(value.values() if isinstance(value, dict) else value)

        return scalars
    if item.type != FieldDescriptor.TYPE_MESSAGE or (nested := _collector(item.message_type)) is None:
        return None

    def messages(struct: Any, ints: list[Any], times: list[Any]) -> None:
        value = getattr(struct, name)
        if value is msgspec.UNSET:
            return
        for message in (value.values() if isinstance(value, dict) else value) if many else (value,):
            nested(message, ints, times)

    return messages


def decode_records(descriptor: Descriptor | Any, payload: bytes | bytearray) -> list[dict[str, Any]]:
    """The records of a record-stream payload (a JSON array of ``descriptor`` messages) as
    dicts of their known fields; BadShape says what is wrong (and where, for the C pass)."""
    try:
        structs = _decoder(descriptor).decode(payload)
    except msgspec.ValidationError as exc:
        raise BadShape(str(exc)) from exc
    except (msgspec.DecodeError, RecursionError) as exc:
        raise BadShape(f"not JSON: {exc}") from exc
    collect = _collector(descriptor)
    ints: list[Any] = []
    times: list[Any] = []
    if collect is not None:
        for struct in structs:
            collect(struct, ints, times)
    digits = [v for v in ints if type(v) is str]
    if digits and _INTEGERS(" ".join(digits)) is None:
        bad = next(v for v in digits if _INTEGERS(v) is None)
        raise BadShape(f"an integer field holds {bad!r}, not a 64-bit integer")
    stamps = [v for v in times if v is not msgspec.UNSET]
    if stamps and _TIMESTAMPS(" ".join(stamps)) is None:
        bad = next(v for v in stamps if _TIMESTAMPS(v) is None)
        raise BadShape(f"a timestamp field holds {bad!r}, not an RFC 3339 time")
    records: list[dict[str, Any]] = msgspec.to_builtins(structs)
    return records


def json_number(value: Any) -> float:
    """A number from a stored record (protobuf JSON writes 64-bit integers as strings); 0.0 when
    absent or not a number. Stored records passed ``decode_records``, so this only guards old rows."""
    try:
        return float(value) if value is not None else 0.0
    except (TypeError, ValueError):
        return 0.0
