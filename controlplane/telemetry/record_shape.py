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

Every value is also held to what the database can store, since one value it refuses would fail
the whole batch it came in: integers to their protobuf type's range and never beyond a signed
64-bit integer (SQL BIGINT; a uint64 above that is refused), numbers finite (JSON has no
infinity: a literal like ``1e999`` is refused, the JSON mapping's "NaN"/"Infinity" strings stay
strings), strings to ``MAX_STRING_CHARS``, maps and lists to ``MAX_ENTRIES``. A payload is first
split into its elements without building them (``msgspec.Raw``), so the record count and each
record's size are judged before a single record object exists.

A number that is well-formed but outside its field's range is ``ShapeProblem.OUT_OF_RANGE``,
named by its path (``$.seq``, ``$.errorsByCode["x"]``); any other fault is MALFORMED. msgspec
says only "this failed", in text, so a refused record is looked at again, and only then
(``range_fault``): the happy path pays nothing for the distinction.
"""

from __future__ import annotations

import enum
import json
import re
import sys
from collections import defaultdict
from collections.abc import Callable
from functools import cache
from operator import attrgetter
from typing import Annotated, Any, Literal

import msgspec
from google.protobuf.descriptor import Descriptor, FieldDescriptor

from edgefleet.controlplane.store.values import INT64_MAX, INT64_MIN

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
_INT32 = (-(2**31), 2**31 - 1)
_UINT32 = (0, 2**32 - 1)
_INT64 = (INT64_MIN, INT64_MAX)
_UINT64 = (0, INT64_MAX)  # a uint64 beyond BIGINT cannot be stored or compared in SQL
Range = tuple[int, int]
_INT_RANGES: dict[int, Range] = {
    FieldDescriptor.TYPE_INT32: _INT32,
    FieldDescriptor.TYPE_SINT32: _INT32,
    FieldDescriptor.TYPE_SFIXED32: _INT32,
    FieldDescriptor.TYPE_UINT32: _UINT32,
    FieldDescriptor.TYPE_FIXED32: _UINT32,
    FieldDescriptor.TYPE_INT64: _INT64,
    FieldDescriptor.TYPE_SINT64: _INT64,
    FieldDescriptor.TYPE_SFIXED64: _INT64,
    FieldDescriptor.TYPE_UINT64: _UINT64,
    FieldDescriptor.TYPE_FIXED64: _UINT64,
}
MAX_STRING_CHARS = 4096
"""Longest string value of a record (the agent's longest, an error text, is far shorter)."""
MAX_ENTRIES = 256
"""Most entries of one map or list field (errors by code, installed models)."""
MAX_RECORDS_PER_MESSAGE = 500
"""Most records in one message: the agent sends at most 100 (agent/telemetry/publisher.py)."""
MAX_RECORD_BYTES = 64 * 1024
"""Largest encoded record: the agent keeps a whole message below 128 KiB."""

DOUBLE_MAX = sys.float_info.max
_FINITE = msgspec.Meta(ge=-DOUBLE_MAX, le=DOUBLE_MAX)
_DOUBLE = Annotated[float, _FINITE] | Literal["NaN", "Infinity", "-Infinity"]
_STRING = Annotated[str, msgspec.Meta(max_length=MAX_STRING_CHARS)]


class ShapeProblem(enum.Enum):
    """What is wrong with a payload, as far as its shape tells."""

    MALFORMED = "malformed"  # not JSON, a wrong type, a string or a map or list too long
    OUT_OF_RANGE = "out_of_range"  # a well-formed number beyond its field's range (or not finite)
    TOO_MANY_RECORDS = "too_many_records"
    RECORD_TOO_LARGE = "record_too_large"


class BadShape(ValueError):
    """A payload that is not a JSON array of records of its message; the text says where,
    ``problem`` what kind of fault it is."""

    def __init__(self, detail: str, problem: ShapeProblem = ShapeProblem.MALFORMED) -> None:
        super().__init__(detail)
        self.problem = problem


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
        low, high = _INT_RANGES[field.type]
        return Annotated[int, msgspec.Meta(ge=low, le=high)] | _STRING
    if field.type in (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT):
        return _DOUBLE
    if field.type == FieldDescriptor.TYPE_BOOL:
        return bool
    if field.type == FieldDescriptor.TYPE_ENUM:
        return Annotated[int, msgspec.Meta(ge=_INT32[0], le=_INT32[1])] | _STRING
    if field.type in (FieldDescriptor.TYPE_STRING, FieldDescriptor.TYPE_BYTES) or _is_timestamp(field):
        return _STRING
    assert field.message_type is not None, f"{field.full_name}: a field of an unknown type"
    return struct_of(field.message_type)


def _field_type(field: FieldDescriptor | Any) -> Any:
    entries = msgspec.Meta(max_length=MAX_ENTRIES)
    if _is_map(field):
        return Annotated[dict[_STRING, _scalar_type(_map_value(field))], entries]  # type: ignore[misc]
    scalar = _scalar_type(field)
    return Annotated[list[scalar], entries] if field.is_repeated else scalar  # type: ignore[valid-type]


@cache
def struct_of(descriptor: Descriptor | Any) -> type[msgspec.Struct]:
    """The msgspec Struct of a message: its JSON field names, each optional (UNSET when absent,
    and then left out of the stored record)."""
    fields = [(f.json_name, _field_type(f) | msgspec.UnsetType, msgspec.UNSET) for f in descriptor.fields]
    return msgspec.defstruct(descriptor.name, fields)


@cache
def _decoder(descriptor: Descriptor | Any) -> msgspec.json.Decoder[Any]:
    return msgspec.json.Decoder(struct_of(descriptor))


_ELEMENTS = msgspec.json.Decoder(list[msgspec.Raw])


# the Python pass: strings the C pass cannot judge ---------------------------------------------

Integers = defaultdict[Range, list[Any]]  # integer values by the range their field allows
Collect = Callable[[Any, Integers, list[Any]], None]  # (struct, integers, timestamps)

# One regular expression over all of a payload's digit strings (or timestamps) joined by spaces:
# one C call per payload instead of one per value.
_INTEGERS = re.compile(r"-?\d{1,20}(?: -?\d{1,20})*", re.ASCII).fullmatch
# Digit strings that fit every integer field, signed or not: the common case, judged in one call.
_SHORT_UNSIGNED = re.compile(r"\d{1,9}(?: \d{1,9})*", re.ASCII).fullmatch


def _fitting(bounds: Range) -> Callable[[str], re.Match[str] | None]:
    sign = "-?" if bounds[0] < 0 else ""
    digits = 9 if bounds[1] < 2**32 else 18
    return re.compile(rf"{sign}\d{{1,{digits}}}(?: {sign}\d{{1,{digits}}})*", re.ASCII).fullmatch


_FITS = {bounds: _fitting(bounds) for bounds in set(_INT_RANGES.values())}
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
    """A function that appends a struct's integer values (digit strings among them), by their
    field's range, and its timestamps, nested messages', maps' and lists' included, to what it
    is given; None for a message that holds neither at any depth."""
    by_range: dict[Range, list[str]] = {}
    for f in descriptor.fields:
        if f.type in _INT_TYPES and not f.is_repeated:
            by_range.setdefault(_INT_RANGES[f.type], []).append(f.json_name)
    stamps = [f.json_name for f in descriptor.fields if _is_timestamp(f) and not f.is_repeated]
    deep: list[Collect] = [c for f in descriptor.fields if (c := _deep_collector(f)) is not None]
    if not (by_range or stamps or deep):
        return None
    get_integers = [(bounds, _tuple_getter(names)) for bounds, names in by_range.items()]
    get_stamps = _tuple_getter(stamps) if stamps else None

    def collect(struct: Any, ints: Integers, times: list[Any]) -> None:
        for bounds, get in get_integers:
            ints[bounds].extend(get(struct))
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
        bounds = _INT_RANGES.get(item.type)

        def scalars(struct: Any, ints: Integers, times: list[Any]) -> None:
            value = getattr(struct, name)
            if value is not msgspec.UNSET:
                (times if bounds is None else ints[bounds]).extend(
                    value.values() if isinstance(value, dict) else value
                )

        return scalars
    if item.type != FieldDescriptor.TYPE_MESSAGE or (nested := _collector(item.message_type)) is None:
        return None

    def messages(struct: Any, ints: Integers, times: list[Any]) -> None:
        value = getattr(struct, name)
        if value is msgspec.UNSET:
            return
        for message in (value.values() if isinstance(value, dict) else value) if many else (value,):
            nested(message, ints, times)

    return messages


def decode_records(
    descriptor: Descriptor | Any,
    payload: bytes | bytearray,
    *,
    max_records: int = MAX_RECORDS_PER_MESSAGE,
    max_record_bytes: int = MAX_RECORD_BYTES,
) -> list[dict[str, Any]]:
    """The records of a record-stream payload (a JSON array of ``descriptor`` messages) as
    dicts of their known fields; BadShape says what is wrong (and where, for the C pass)."""
    try:
        elements = _ELEMENTS.decode(payload)
    except msgspec.ValidationError as exc:
        raise BadShape(str(exc)) from exc
    except (msgspec.DecodeError, RecursionError) as exc:
        raise BadShape(f"not JSON: {exc}") from exc
    if len(elements) > max_records:
        raise BadShape(f"{len(elements)} records, more than {max_records}", ShapeProblem.TOO_MANY_RECORDS)
    decoder = _decoder(descriptor)
    structs = []
    for index, element in enumerate(elements):
        if len(element) > max_record_bytes:
            raise BadShape(
                f"record {index} takes {len(element)} bytes, more than {max_record_bytes}",
                ShapeProblem.RECORD_TOO_LARGE,
            )
        try:
            structs.append(decoder.decode(element))
        except msgspec.ValidationError as exc:
            if (fault := range_fault(descriptor, element)) is not None:
                raise BadShape(f"record {index}: {fault}", ShapeProblem.OUT_OF_RANGE) from exc
            raise BadShape(f"record {index}: {exc}") from exc
        except (msgspec.DecodeError, RecursionError) as exc:
            raise BadShape(f"record {index}: not JSON: {exc}") from exc
    collect = _collector(descriptor)
    ints: Integers = defaultdict(list)
    times: list[Any] = []
    if collect is not None:
        for struct in structs:
            collect(struct, ints, times)
    digits = [v for values in ints.values() for v in values if type(v) is str]
    joined = " ".join(digits)
    if digits and _INTEGERS(joined) is None:
        bad = next(v for v in digits if _INTEGERS(v) is None)
        raise BadShape(f"an integer field holds {bad!r}, not a 64-bit integer")
    if (
        digits
        and _SHORT_UNSIGNED(joined) is None
        and any(_digits_beyond(bounds, values) for bounds, values in ints.items())
    ):
        raise BadShape(_first_range_fault(descriptor, elements), ShapeProblem.OUT_OF_RANGE)
    stamps = [v for v in times if v is not msgspec.UNSET]
    if stamps and _TIMESTAMPS(" ".join(stamps)) is None:
        bad = next(v for v in stamps if _TIMESTAMPS(v) is None)
        raise BadShape(f"a timestamp field holds {bad!r}, not an RFC 3339 time")
    records: list[dict[str, Any]] = msgspec.to_builtins(structs)
    return records


def _digits_beyond(bounds: Range, values: list[Any]) -> bool:
    """Whether a digit string among ``values`` (all already well-formed) lies outside ``bounds``.
    One regular expression clears the strings short enough to fit (9 digits any 32-bit range, 18
    any 64-bit one, a minus sign only a signed one); only the rest are converted."""
    strings = [v for v in values if type(v) is str]
    if not strings or _FITS[bounds](" ".join(strings)) is not None:
        return False
    low, high = bounds
    return any(not low <= int(v) <= high for v in strings)


def _first_range_fault(descriptor: Descriptor | Any, elements: list[msgspec.Raw]) -> str:
    """Where the first out-of-range value of a payload is, which the fast check found somewhere."""
    for index, element in enumerate(elements):
        if (fault := range_fault(descriptor, element)) is not None:
            return f"record {index}: {fault}"
    return "an integer field holds a value beyond its range"  # pragma: no cover (found above)


def range_fault(descriptor: Descriptor | Any, element: bytes | msgspec.Raw) -> str | None:
    """The first value of one encoded record that is a well-formed number outside its field's
    range, as "<path> = <value>, outside <range>"; None when there is none (or the record is not
    JSON). Read with Python's json module, which, unlike msgspec, turns ``1e999`` into infinity
    instead of refusing it unnamed (its NaN and Infinity literals, not JSON, stay refused). Only
    for records already refused: it is slow."""
    try:
        record = json.loads(bytes(element), parse_constant=_not_json)
        return _message_fault(descriptor, record, "$")
    except (ValueError, RecursionError):  # not JSON, or beyond Python's digit limit for ints
        return None


def _not_json(literal: str) -> Any:
    raise ValueError(f"{literal} is not JSON")


def _message_fault(descriptor: Descriptor | Any, message: Any, path: str) -> str | None:
    if not isinstance(message, dict):
        return None  # a wrong type: malformed
    for field in descriptor.fields:
        if field.json_name not in message:
            continue
        value = message[field.json_name]
        where = f"{path}.{field.json_name}"
        if _is_map(field) and isinstance(value, dict):
            items = [(_map_value(field), v, f"{where}[{_clip(json.dumps(k))}]") for k, v in value.items()]
        elif field.is_repeated and isinstance(value, list):
            items = [(field, v, f"{where}[{i}]") for i, v in enumerate(value)]
        else:
            items = [(field, value, where)]
        for item_field, item, item_path in items:
            if (fault := _value_fault(item_field, item, item_path)) is not None:
                return fault
    return None


def _value_fault(field: FieldDescriptor | Any, value: Any, path: str) -> str | None:
    """What is out of range about one value of ``field`` (a nested message's values included);
    None when it is in range or not a number at all (then it is malformed, if anything)."""
    if field.type == FieldDescriptor.TYPE_MESSAGE and not _is_timestamp(field):
        return _message_fault(field.message_type, value, path)
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        return None
    if field.type in _INT_TYPES or field.type == FieldDescriptor.TYPE_ENUM:
        if isinstance(value, float) or (isinstance(value, str) and _INTEGERS(value) is None):
            return None  # a fraction or an enum's name: not a range question
        low, high = _INT_RANGES.get(field.type, _INT32)
        if low <= int(value) <= high:
            return None
        return f"{path} = {_clip(repr(value))}, outside [{low}, {high}]"
    doubles = (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT)
    if field.type in doubles and not isinstance(value, str) and not -DOUBLE_MAX <= value <= DOUBLE_MAX:
        return f"{path} = {_clip(repr(value))}, not a finite double"
    return None


def _clip(text: str) -> str:
    """A value or map key short enough for a message: a device chooses them."""
    return text if len(text) <= 40 else text[:37] + "..."
