"""Telemetry retention: raw rows for days, hourly rollups for a year.

A fleet of a thousand devices sending a heartbeat and an inference summary every 15 s writes
about 12 million rows a day; nobody reads last month's at 15 s resolution. Raw rows older than
``raw_for`` are folded into hourly rollups (one row per device, kind and hour: counts, sums
and maxima that still answer "how busy, how fast, how many errors") and deleted; rollups
older than ``rollups_for`` are deleted.

Each chunk is folded and deleted in one transaction, and the delete must remove exactly the
rows that were folded, else the transaction rolls back: a crash or a second control-plane
replica running the same pass can never count a row twice or lose it.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Connection, delete, select
from sqlalchemy.engine import Engine

from controlplane.db.models import TelemetryDeadLetter, TelemetryRecord, TelemetryRollup
from controlplane.record_shape import json_number

log = logging.getLogger(__name__)


class RetentionConflict(Exception):
    """Another pass deleted rows this one folded; this chunk is rolled back and retried later."""


@dataclass(frozen=True, slots=True)
class RetentionPolicy:
    raw_for: timedelta = timedelta(days=7)
    rollups_for: timedelta = timedelta(days=365)
    chunk_rows: int = 5000

    def __post_init__(self) -> None:
        if self.raw_for <= timedelta(0) or self.rollups_for < self.raw_for or self.chunk_rows < 1:
            raise ValueError("need 0 < raw_for <= rollups_for and chunk_rows >= 1")


@dataclass(frozen=True, slots=True)
class RetentionResult:
    folded_rows: int
    deleted_rollups: int


@dataclass(slots=True)
class _Hour:
    """The running totals of one (device, kind, hour)."""

    records: int = 0
    requests: int = 0
    errors: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    decode_tokens: int = 0
    decode_seconds: float = 0.0
    latency_ms_p95_max: float = 0.0
    rss_bytes_max: int = 0
    cpu_percent_sum: float = 0.0

    def add(self, kind: str, payload: Mapping[str, Any]) -> None:
        self.records += 1
        if kind == "inference":
            self.requests += int(json_number(payload.get("requests")))
            self.errors += int(json_number(payload.get("errors")))
            self.prompt_tokens += int(json_number(payload.get("promptTokens")))
            self.completion_tokens += int(json_number(payload.get("completionTokens")))
            self.decode_tokens += int(json_number(payload.get("decodeTokens")))
            self.decode_seconds += json_number(payload.get("decodeSeconds"))
            self.latency_ms_p95_max = max(self.latency_ms_p95_max, json_number(payload.get("latencyMsP95")))
        elif kind == "heartbeat":
            self.rss_bytes_max = max(self.rss_bytes_max, int(json_number(payload.get("rssBytes"))))
            self.cpu_percent_sum += json_number(payload.get("cpuPercent"))


def hour_of(moment: datetime) -> datetime:
    """The UTC hour ``moment`` falls in (a naive ``moment`` is UTC, as stored)."""
    aware = moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)
    return aware.astimezone(UTC).replace(minute=0, second=0, microsecond=0)


def apply_retention(
    engine: Engine, policy: RetentionPolicy, *, now: datetime | None = None
) -> RetentionResult:
    """One pass: fold every raw row older than the policy allows, drop expired rollups."""
    now = now or datetime.now(UTC)
    cutoff = now - policy.raw_for
    folded = 0
    while True:
        try:
            with engine.begin() as conn:
                count = _fold_chunk(conn, cutoff, policy.chunk_rows)
        except RetentionConflict as exc:
            log.info("%s", exc)
            break
        folded += count
        if count < policy.chunk_rows:
            break
    rollups = TelemetryRollup.__table__  # type: ignore[attr-defined]
    with engine.begin() as conn:
        too_old = rollups.c.hour < hour_of(now - policy.rollups_for)
        expired = conn.execute(delete(rollups).where(too_old)).rowcount
        # Dead letters are kept as long as raw rows: long enough to look into, never forever.
        letters = TelemetryDeadLetter.__table__  # type: ignore[attr-defined]
        conn.execute(delete(letters).where(letters.c.received_at < cutoff))
    if folded or expired:
        log.info(
            "telemetry retention: folded %d raw rows into hourly rollups, deleted %d rollups", folded, expired
        )
    return RetentionResult(folded_rows=folded, deleted_rollups=expired)


def _fold_chunk(conn: Connection, cutoff: datetime, limit: int) -> int:
    raw = TelemetryRecord.__table__  # type: ignore[attr-defined]
    rows = conn.execute(
        select(raw.c.id, raw.c.device_id, raw.c.kind, raw.c.time, raw.c.payload)
        .where(raw.c.time < cutoff)
        .order_by(raw.c.id)
        .limit(limit)
    ).all()
    if not rows:
        return 0
    hours: dict[tuple[str, str, datetime], _Hour] = {}
    for row in rows:
        payload = row.payload if isinstance(row.payload, dict) else {}
        hours.setdefault((row.device_id, row.kind, hour_of(row.time)), _Hour()).add(row.kind, payload)
    deleted = conn.execute(delete(raw).where(raw.c.id.in_([row.id for row in rows]))).rowcount
    if deleted != len(rows):
        raise RetentionConflict(
            f"another retention pass took {len(rows) - deleted} of these rows; rolled back"
        )
    _merge(conn, hours)
    return len(rows)


FIGURES = (
    "records",
    "requests",
    "errors",
    "prompt_tokens",
    "completion_tokens",
    "decode_tokens",
    "decode_seconds",
    "latency_ms_p95_max",
    "rss_bytes_max",
    "cpu_percent_sum",
)
MAXIMA = frozenset({"latency_ms_p95_max", "rss_bytes_max"})


def _merge(conn: Connection, hours: Mapping[tuple[str, str, datetime], _Hour]) -> None:
    """Adds the chunk's totals to the rollups (a chunk may end mid-hour: the next one adds on)."""
    table = TelemetryRollup.__table__  # type: ignore[attr-defined]
    devices = sorted({device for device, _, _ in hours})
    existing = {
        (r.device_id, r.kind, hour_of(r.hour)): r
        for r in conn.execute(
            select(table).where(table.c.device_id.in_(devices), table.c.hour.in_({h for _, _, h in hours}))
        ).all()
    }
    for (device_id, kind, hour), totals in hours.items():
        mine = {name: getattr(totals, name) for name in FIGURES}
        old = existing.get((device_id, kind, hour))
        if old is None:
            conn.execute(table.insert().values(device_id=device_id, kind=kind, hour=hour, **mine))
            continue
        merged = {
            name: max(getattr(old, name), value) if name in MAXIMA else getattr(old, name) + value
            for name, value in mine.items()
        }
        key = (table.c.device_id == device_id) & (table.c.kind == kind) & (table.c.hour == old.hour)
        conn.execute(table.update().where(key).values(**merged))
