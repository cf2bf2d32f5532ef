"""Values every store module shares: UTC times as read back, the bound on stored names, error
texts cut to a size a caller can read, and numbers read back from stored telemetry records as
columns can hold them.

Here rather than in the API's bounds module because the store raises the refusals these texts
go into, and the store imports no other control-plane package; ``api.limits`` re-exports them.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

INT64_MIN = -(2**63)
INT64_MAX = 2**63 - 1
"""The range of a BIGINT column (and of SQLite's INTEGER)."""
MAX_NAME_CHARS = 128
"""Bundle, rollout and variant names: the columns that hold them."""
LISTED_IN_ERROR = 5
"""How many offending items an error names."""


def as_utc(value: datetime) -> datetime:
    """SQLite returns naive datetimes; everything here is UTC."""
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def clip(text: str, limit: int = 200) -> str:
    """``text`` cut to at most ``limit`` characters, saying how long it was."""
    if len(text) <= limit:
        return text
    suffix = f"… ({len(text)} characters)"
    return text[: max(0, limit - len(suffix))] + suffix


def first_few(items: Iterable[str], *, what: str) -> str:
    """ "3 unknown device ids: a, b, c" or "50000 unknown device ids, first 5: a, b, c, d, e"."""
    listed = sorted(items)
    shown = ", ".join(clip(i, 64) for i in listed[:LISTED_IN_ERROR])
    if len(listed) <= LISTED_IN_ERROR:
        return f"{len(listed)} {what}: {shown}"
    return f"{len(listed)} {what}, first {LISTED_IN_ERROR}: {shown}"


def json_number(value: Any) -> float:
    """A number from a stored record (protobuf JSON writes 64-bit integers as strings); 0.0 when
    absent, not a number or not finite (the JSON mapping's "NaN" and "Infinity" strings): a
    database column cannot hold those (SQLite stores NaN as NULL)."""
    try:
        number = float(value) if value is not None else 0.0
    except (TypeError, ValueError):
        return 0.0
    return number if math.isfinite(number) else 0.0


def json_counter(value: Any) -> int:
    """A uint64 counter from a stored record (a number or a digit string) as an exact integer
    within BIGINT: 0 when absent or not a number, at most INT64_MAX. Exact, not through a float:
    float(2**63 - 1) rounds up to 2**63, which no BIGINT column holds."""
    if isinstance(value, bool):
        return 0
    if isinstance(value, int):
        number = value
    else:
        try:
            number = int(value) if isinstance(value, str) else int(json_number(value))
        except ValueError:  # "1.5", "NaN": not protobuf's JSON of an integer, read as a number
            number = int(json_number(value))
    return min(max(number, 0), INT64_MAX)
