"""Telemetry retention: raw rows for days, hourly rollups for a year.

A fleet of a thousand devices sending a heartbeat and an inference summary every 15 s writes
about 12 million rows a day; nobody reads last month's at 15 s resolution. Raw rows older than
``raw_for`` are folded into hourly rollups (one row per device, kind and hour: counts, sums
and maxima that still answer "how busy, how fast, how many errors") and deleted; rollups
older than ``rollups_for`` are deleted.

Each chunk is folded and deleted in one transaction, and the delete must remove exactly the
rows that were folded, else the transaction rolls back: a crash or a second control-plane
replica running the same pass can never count a row twice or lose it.

A fold can never overflow its columns: counters are read exactly (``json_counter``, never
through a float) and every rollup figure saturates, integers at BIGINT's maximum and sums of
doubles at the largest finite double, with a warning that says which hour was clamped (a
device admitting 2^63-1 requests an hour is broken, and its rollup says "at least this much").
One failing step of a pass (folding, expiring rollups, pruning dead letters) is logged and
counted in the pass's result, and the others still run; the next pass retries.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Connection, delete, select
from sqlalchemy.engine import Engine

from edgefleet.controlplane.store.models import TelemetryDeadLetter, TelemetryRecord, TelemetryRollup
from edgefleet.controlplane.store.values import INT64_MAX, json_counter, json_number

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
    """What one pass did. ``saturated``: rollup figures clamped to their column's range;
    ``failed``: the steps that failed this pass (logged; the other steps ran)."""

    folded_rows: int
    deleted_rollups: int
    saturated: int = 0
    failed: tuple[str, ...] = ()


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
        # Python integers and floats do not overflow here (a float sum may reach infinity);
        # ``saturate`` brings every figure back into its column before it is written.
        if kind == "inference":
            self.requests += json_counter(payload.get("requests"))
            self.errors += json_counter(payload.get("errors"))
            self.prompt_tokens += json_counter(payload.get("promptTokens"))
            self.completion_tokens += json_counter(payload.get("completionTokens"))
            self.decode_tokens += json_counter(payload.get("decodeTokens"))
            self.decode_seconds += json_number(payload.get("decodeSeconds"))
            self.latency_ms_p95_max = max(self.latency_ms_p95_max, json_number(payload.get("latencyMsP95")))
        elif kind == "heartbeat":
            self.rss_bytes_max = max(self.rss_bytes_max, json_counter(payload.get("rssBytes")))
            self.cpu_percent_sum += json_number(payload.get("cpuPercent"))


def hour_of(moment: datetime) -> datetime:
    """The UTC hour ``moment`` falls in (a naive ``moment`` is UTC, as stored)."""
    aware = moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)
    return aware.astimezone(UTC).replace(minute=0, second=0, microsecond=0)


def apply_retention(
    engine: Engine, policy: RetentionPolicy, *, now: datetime | None = None
) -> RetentionResult:
    """One pass: fold every raw row older than the policy allows, drop expired rollups and
    dead letters. Never raises for a failing step: it is logged and named in ``failed``."""
    now = now or datetime.now(UTC)
    cutoff = now - policy.raw_for
    pass_ = _Pass()
    pass_.step("fold", lambda: _fold_all(engine, cutoff, policy.chunk_rows, pass_))
    rollups = TelemetryRollup.__table__  # type: ignore[attr-defined]
    too_old = rollups.c.hour < hour_of(now - policy.rollups_for)
    expired = pass_.step("expire rollups", lambda: _delete(engine, delete(rollups).where(too_old)))
    # Dead letters are kept as long as raw rows: long enough to look into, never forever.
    letters = TelemetryDeadLetter.__table__  # type: ignore[attr-defined]
    pass_.step(
        "prune dead letters", lambda: _delete(engine, delete(letters).where(letters.c.received_at < cutoff))
    )
    if pass_.folded or expired:
        log.info(
            "telemetry retention: folded %d raw rows into hourly rollups, deleted %d rollups",
            pass_.folded,
            expired,
        )
    return RetentionResult(
        folded_rows=pass_.folded,
        deleted_rollups=expired,
        saturated=pass_.saturated,
        failed=tuple(pass_.failed),
    )


@dataclass(slots=True)
class _Pass:
    """What one pass has done so far."""

    folded: int = 0
    saturated: int = 0
    failed: list[str] = field(default_factory=list)

    def step(self, name: str, work: Callable[[], int]) -> int:
        """Runs one step; a failure is logged and recorded, and the pass goes on (0 rows)."""
        try:
            return work()
        except Exception:  # any failure: the other steps, and the next pass, must still run
            log.exception("telemetry retention: %s failed; the next pass retries it", name)
            self.failed.append(name)
            return 0


def _delete(engine: Engine, statement: Any) -> int:
    with engine.begin() as conn:
        return int(conn.execute(statement).rowcount)


def _fold_all(engine: Engine, cutoff: datetime, chunk_rows: int, pass_: _Pass) -> int:
    """Folds chunk after chunk until none is left (or another pass took the rows)."""
    while True:
        try:
            with engine.begin() as conn:
                count, saturated = _fold_chunk(conn, cutoff, chunk_rows)
        except RetentionConflict as exc:
            log.info("%s", exc)
            return pass_.folded
        pass_.folded += count
        pass_.saturated += saturated
        if count < chunk_rows:
            return pass_.folded


def _fold_chunk(conn: Connection, cutoff: datetime, limit: int) -> tuple[int, int]:
    """Folds and deletes one chunk of raw rows: (rows folded, figures saturated)."""
    raw = TelemetryRecord.__table__  # type: ignore[attr-defined]
    rows = conn.execute(
        select(raw.c.id, raw.c.device_id, raw.c.kind, raw.c.time, raw.c.payload)
        .where(raw.c.time < cutoff)
        .order_by(raw.c.id)
        .limit(limit)
    ).all()
    if not rows:
        return 0, 0
    hours: dict[tuple[str, str, datetime], _Hour] = {}
    for row in rows:
        payload = row.payload if isinstance(row.payload, dict) else {}
        hours.setdefault((row.device_id, row.kind, hour_of(row.time)), _Hour()).add(row.kind, payload)
    deleted = conn.execute(delete(raw).where(raw.c.id.in_([row.id for row in rows]))).rowcount
    if deleted != len(rows):
        raise RetentionConflict(
            f"another retention pass took {len(rows) - deleted} of these rows; rolled back"
        )
    return len(rows), _merge(conn, hours)


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
FLOAT_MAX = sys.float_info.max


def saturate(value: float) -> tuple[float, bool]:
    """``value`` within its column (BIGINT for an int, a finite double for a float) and whether
    it had to be clamped. Counters are never negative; doubles here are sums of finite ones."""
    if isinstance(value, int):
        return (INT64_MAX, True) if value > INT64_MAX else (value, False)
    return (FLOAT_MAX, True) if value > FLOAT_MAX else (value, False)


def _merge(conn: Connection, hours: Mapping[tuple[str, str, datetime], _Hour]) -> int:
    """Adds the chunk's totals to the rollups (a chunk may end mid-hour: the next one adds on),
    each figure saturated at its column's limit; returns how many figures were clamped."""
    table = TelemetryRollup.__table__  # type: ignore[attr-defined]
    devices = sorted({device for device, _, _ in hours})
    existing = {
        (r.device_id, r.kind, hour_of(r.hour)): r
        for r in conn.execute(
            select(table).where(table.c.device_id.in_(devices), table.c.hour.in_({h for _, _, h in hours}))
        ).all()
    }
    clamped_figures = 0
    for (device_id, kind, hour), totals in hours.items():
        mine = {name: getattr(totals, name) for name in FIGURES}
        old = existing.get((device_id, kind, hour))
        if old is not None:
            mine = {
                name: max(getattr(old, name), value) if name in MAXIMA else getattr(old, name) + value
                for name, value in mine.items()
            }
        values: dict[str, float] = {}
        clamped: list[str] = []
        for name, value in mine.items():
            values[name], was_clamped = saturate(value)
            if was_clamped:
                clamped.append(name)
        if clamped:
            clamped_figures += len(clamped)
            log.warning(
                "telemetry retention: %s's %s rollup of %s saturated %s at the column's maximum",
                device_id,
                kind,
                hour.isoformat(),
                ", ".join(clamped),
            )
        if old is None:
            conn.execute(table.insert().values(device_id=device_id, kind=kind, hour=hour, **values))
            continue
        key = (table.c.device_id == device_id) & (table.c.kind == kind) & (table.c.hour == old.hour)
        conn.execute(table.update().where(key).values(**values))
    return clamped_figures
