"""Bounds on what callers send and on what the control plane says back.

Everything a device or an operator sends is stored, listed, audited or echoed in an error. A
value with no bound becomes a reply over the gRPC message limit for every later reader (one
device's 7 MB of labels broke the fleet listing for everyone), or an error header the caller
cannot read. So a request is checked against these bounds before any handler runs
(``check_request``), labels against their own stricter form (``edgefleet.protos.fleet.selectors``), and
every error text is cut (``clip``, ``first_few``, shared with the store through
``edgefleet.controlplane.store.values``) before it leaves.
"""

from __future__ import annotations

from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from edgefleet.controlplane.store.values import LISTED_IN_ERROR as LISTED_IN_ERROR
from edgefleet.controlplane.store.values import MAX_NAME_CHARS as MAX_NAME_CHARS
from edgefleet.controlplane.store.values import clip as clip
from edgefleet.controlplane.store.values import first_few as first_few

MAX_STRING_CHARS = 16_384
"""Any string field of a request; names and ids have smaller bounds of their own."""
MAX_REPEATED = 10_000
"""Entries of any repeated or map field of a request (device ids per deploy, say)."""
MAX_ERROR_CHARS = 1_024
"""An error's details as the caller reads them."""
MAX_INT64 = 2**63 - 1
"""uint64 fields land in signed 64-bit columns."""


class RequestTooLarge(Exception):
    """A request field is longer, or has more entries, than the bounds allow."""


def _is_repeated(field: FieldDescriptor) -> bool:
    return field.is_repeated


def _is_map(field: FieldDescriptor) -> bool:
    entry = field.message_type
    return entry is not None and entry.GetOptions().map_entry


def _check_value(field: FieldDescriptor, value: object, path: str) -> None:
    if isinstance(value, str) and len(value) > MAX_STRING_CHARS:
        raise RequestTooLarge(f"{path} is longer than {MAX_STRING_CHARS} characters ({len(value)})")
    if isinstance(value, int) and value > MAX_INT64:
        raise RequestTooLarge(f"{path} is larger than {MAX_INT64}")
    if isinstance(value, Message):
        check_request(value, prefix=f"{path}.")


def check_request(message: Message, *, prefix: str = "") -> None:
    """Raises RequestTooLarge for the first string, integer or repeated field of ``message`` (at
    any depth) past MAX_STRING_CHARS, MAX_INT64 or MAX_REPEATED. Bytes are bounded by the
    message limit."""
    for field, value in message.ListFields():
        path = f"{prefix}{field.name}"
        if not _is_repeated(field):
            _check_value(field, value, path)
            continue
        if len(value) > MAX_REPEATED:
            raise RequestTooLarge(f"{path} has {len(value)} entries; at most {MAX_REPEATED}")
        if _is_map(field):
            for key in value:
                _check_value(field, key, f"{path} key")
                _check_value(field, value[key], f"{path}[{clip(str(key), 40)!r}]")
        else:
            for item in value:
                _check_value(field, item, path)
