"""Bulk telemetry writes: SQLAlchemy Core, one statement per batch, duplicates ignored.

Telemetry arrives at least once (MQTT QoS 1 and the agent's outbox both redeliver), so the
insert skips rows whose (device_id, seq) is already stored instead of failing the batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import insert, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Engine

from controlplane.db.models import Device, TelemetryRecord


@dataclass(frozen=True, slots=True)
class IngestRecord:
    """One decoded telemetry message, ready to store."""

    device_id: str
    kind: str
    seq: int
    time: datetime
    payload: dict[str, Any]


def _insert_ignoring_duplicates(engine: Engine) -> Any:
    table = TelemetryRecord.__table__  # type: ignore[attr-defined]
    if engine.dialect.name == "sqlite":
        return sqlite.insert(table).on_conflict_do_nothing(index_elements=["device_id", "seq"])
    if engine.dialect.name == "postgresql":
        return postgresql.insert(table).on_conflict_do_nothing(index_elements=["device_id", "seq"])
    return insert(table)


def insert_telemetry(engine: Engine, *, records: Sequence[IngestRecord]) -> int:
    """Stores a batch and refreshes each device's last-seen and last figures; returns rows sent.

    Records of revoked devices are dropped: a revoked device's telemetry still in flight, or
    sent before the broker let go of it, is not the fleet's data any more.
    """
    if not records:
        return 0
    device_table = Device.__table__  # type: ignore[attr-defined]
    with engine.begin() as conn:
        devices = {r.device_id for r in records}
        rows_of = conn.execute(
            select(device_table.c.id, device_table.c.revoked_at).where(device_table.c.id.in_(list(devices)))
        ).all()
        revoked = {row.id for row in rows_of if row.revoked_at is not None}
        known = {row.id for row in rows_of} - revoked
        kept = [r for r in records if r.device_id not in revoked]
        if not kept:
            return 0
        rows = [
            {"device_id": r.device_id, "kind": r.kind, "seq": r.seq, "time": r.time, "payload": r.payload}
            for r in kept
        ]
        conn.execute(_insert_ignoring_duplicates(engine), rows)
        latest: dict[str, dict[str, Any]] = {}
        for r in sorted(kept, key=lambda r: (r.time, r.seq)):
            figures = latest.setdefault(r.device_id, {})
            figures["last_seen"] = r.time
            if r.kind == "inference" and not r.payload.get("error"):
                figures["last_tokens_per_second"] = float(r.payload.get("tokensPerSecond", 0.0))
                figures["last_latency_ms"] = float(r.payload.get("latencyMs", 0.0))
            elif r.kind == "heartbeat":
                figures["requests_total"] = int(r.payload.get("requestsTotal", 0))
        for device_id, figures in latest.items():
            if device_id in known:
                conn.execute(update(device_table).where(device_table.c.id == device_id).values(**figures))
    return len(rows)
