"""Values every store module shares: UTC times as read back, the bound on stored names, and
error texts cut to a size a caller can read.

Here rather than in the API's bounds module because the store raises the refusals these texts
go into, and the store imports no other control-plane package; ``api.limits`` re-exports them.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, datetime

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
