"""Pagination of list and query RPCs (AIP-158): page_size, an opaque page_token, next_page_token.

Why every list pages: a reply has to fit in the gRPC message limit whatever the fleet size and
whatever a device or operator stored, so a page is cut at ``page_size`` entries and also at
PAGE_BYTES of encoded entries. Positions are keysets (the last entry's sort key), never
offsets, so an insert between two pages neither repeats nor skips an entry of the order.

The token is base64 of a small JSON object naming the method, the position and a digest of the
request's filters; a token from another method or with other filters is refused, as AIP-158
asks, and so is anything that does not decode.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

from google.protobuf.message import Message

PAGE_BYTES = 4 * 1024 * 1024
"""Encoded entries per reply; half the 8 MiB message limit, leaving room for the envelope."""
MAX_TOKEN_CHARS = 1024

Row = TypeVar("Row")
Msg = TypeVar("Msg", bound=Message)
Key = str | int | list[str | int]


class InvalidPageToken(Exception):
    """A page_token this method did not issue for these filters."""


@dataclass(frozen=True, slots=True)
class PageSpec:
    """What one list RPC pages by: its name (bound into tokens), default and maximum size."""

    method: str
    default_size: int
    max_size: int

    def size(self, requested: int) -> int:
        """The page size for a request's page_size (0: the default; above the maximum: it)."""
        return min(requested or self.default_size, self.max_size)


def _filters_digest(filters: Mapping[str, object]) -> str:
    text = json.dumps(filters, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def encode_token(spec: PageSpec, key: Key, filters: Mapping[str, object]) -> str:
    body = json.dumps({"m": spec.method, "k": key, "f": _filters_digest(filters)}, separators=(",", ":"))
    return base64.urlsafe_b64encode(body.encode()).decode().rstrip("=")


def decode_token(spec: PageSpec, token: str, filters: Mapping[str, object]) -> Key | None:
    """The position a page_token names (None for the first page); raises InvalidPageToken."""
    if not token:
        return None
    if len(token) > MAX_TOKEN_CHARS:
        raise InvalidPageToken("page_token is not one this method issued")
    try:
        body = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
    except (binascii.Error, ValueError) as exc:
        raise InvalidPageToken("page_token is not one this method issued") from exc
    if not isinstance(body, dict) or body.get("m") != spec.method or "k" not in body:
        raise InvalidPageToken("page_token is not one this method issued")
    if body.get("f") != _filters_digest(filters):
        raise InvalidPageToken("page_token was issued for other filters; repeat them unchanged")
    key = body["k"]
    if isinstance(key, bool) or not isinstance(key, str | int | list):
        raise InvalidPageToken("page_token is not one this method issued")
    return key


def int_key(key: Key | None) -> int | None:
    if key is None:
        return None
    if isinstance(key, bool) or not isinstance(key, int):
        raise InvalidPageToken("page_token is not one this method issued")
    return key


def str_key(key: Key | None) -> str | None:
    if key is None:
        return None
    if not isinstance(key, str):
        raise InvalidPageToken("page_token is not one this method issued")
    return key


@dataclass(frozen=True, slots=True)
class Page(Generic[Msg]):
    items: list[Msg]
    next_page_token: str


def cut(
    spec: PageSpec,
    rows: Sequence[Row],
    *,
    size: int,
    encode: Callable[[Row], Msg],
    key: Callable[[Row], Key],
    filters: Mapping[str, object],
    budget: int = PAGE_BYTES,
) -> Page[Msg]:
    """The page of ``rows`` (fetched as ``size`` + 1, so one more says a next page exists):
    at most ``size`` entries and ``budget`` encoded bytes, at least one entry. Entries must be
    bounded on their own (each encoder cuts what could be large) so one always fits."""
    items: list[Msg] = []
    used = 0
    for row in rows[:size]:
        message = encode(row)
        cost = message.ByteSize() + 8  # field tag and length prefix
        if items and used + cost > budget:
            break
        items.append(message)
        used += cost
    more = len(items) < len(rows)
    token = encode_token(spec, key(rows[len(items) - 1]), filters) if more and items else ""
    return Page(items, token)
