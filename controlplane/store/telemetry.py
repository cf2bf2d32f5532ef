"""Bulk telemetry writes: SQLAlchemy Core, one INSERT and one UPDATE per device per batch.

Telemetry arrives at least once (MQTT QoS 1 and the agent's outbox both redeliver), so the
insert skips rows whose (device_id, seq) is already stored instead of failing the batch.

Several control-plane replicas write concurrently (each gets part of the stream from a shared
subscription), so nothing here may assume it sees a device's messages in order: ``last_seen``
only moves forward, and a Presence older than the stored one never replaces it (the UPDATE
compares in SQL, against whatever another replica committed). Rows and devices are written in
sorted order so two replicas' transactions take their locks in the same order.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import Boolean, ColumnElement, Table, case, insert, literal, or_, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection, Engine

from edgefleet.controlplane.store.models import Device, TelemetryDeadLetter, TelemetryRecord
from edgefleet.controlplane.store.values import INT64_MAX, json_number


@dataclass(frozen=True, slots=True)
class IngestRecord:
    """One decoded telemetry record, ready to store."""

    device_id: str
    kind: str
    seq: int
    time: datetime
    payload: dict[str, Any]


@dataclass(frozen=True, slots=True)
class PresenceUpdate:
    """A device's Presence: ``time`` is the agent's stamp, or the arrival time for the Last Will
    (which has none); ``stamped`` says which, since only the agent's own stamp is a sign of life."""

    device_id: str
    online: bool
    time: datetime
    reason: str = ""
    stamped: bool = True


@dataclass(frozen=True, slots=True)
class StatusUpdate:
    """A device's retained DeviceStatus; the state itself arrives with the gRPC status report."""

    device_id: str
    time: datetime | None


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """A message acknowledged without being stored, for the dead-letter table. Text fields may
    hold anything a device sent; ``store_dead_letters`` makes them storable."""

    received_at: datetime
    topic: str
    device_id: str
    reason: str
    detail: str
    payload_bytes: int
    payload_sha256: str
    excerpt: bytes


def _storable_text(text: str, limit: int) -> str:
    """``text`` as any database stores it: lone surrogates escaped, NUL (which PostgreSQL text
    refuses) written out, cut to ``limit`` characters."""
    safe = text.encode("utf-8", "backslashreplace").decode("utf-8").replace("\x00", "\\x00")
    return safe[:limit]


def store_dead_letters(engine: Engine, letters: Sequence[DeadLetter]) -> None:
    """Keeps dead letters, every text cut to its column."""
    if not letters:
        return
    rows = [
        {
            "received_at": letter.received_at,
            "topic": _storable_text(letter.topic, 256),
            "device_id": _storable_text(letter.device_id, 64),
            "reason": letter.reason[:32],
            "detail": _storable_text(letter.detail, 1024),
            "payload_bytes": max(0, letter.payload_bytes),
            "payload_sha256": letter.payload_sha256[:64],
            "excerpt": bytes(letter.excerpt[:4096]),
        }
        for letter in letters
    ]
    with engine.begin() as conn:
        conn.execute(insert(TelemetryDeadLetter.__table__), rows)  # type: ignore[attr-defined]


@dataclass
class _DeviceChange:
    """What one batch changes on one device row, folded so it is one UPDATE."""

    seen: datetime | None = None
    figures: dict[str, Any] = field(default_factory=dict)
    presence: PresenceUpdate | None = None

    def see(self, when: datetime) -> None:
        self.seen = when if self.seen is None else max(self.seen, when)


def _insert_ignoring_duplicates(engine: Engine | Connection) -> Any:
    table = TelemetryRecord.__table__  # type: ignore[attr-defined]
    if engine.dialect.name == "sqlite":
        return sqlite.insert(table).on_conflict_do_nothing(index_elements=["device_id", "seq"])
    if engine.dialect.name == "postgresql":
        return postgresql.insert(table).on_conflict_do_nothing(index_elements=["device_id", "seq"])
    return insert(table)


def insert_telemetry(engine: Engine, *, records: Sequence[IngestRecord]) -> int:
    """Stores a batch of records and refreshes each device's last-seen and last figures;
    returns the rows sent to the database (revoked devices' left out)."""
    return store_batch(engine, records=records)


def store_batch(
    engine: Engine,
    *,
    records: Sequence[IngestRecord] = (),
    presence: Sequence[PresenceUpdate] = (),
    statuses: Sequence[StatusUpdate] = (),
) -> int:
    """Stores telemetry records and applies presence and status, in one transaction; returns
    the telemetry rows sent to the database.

    Everything of revoked devices is dropped: a revoked device's telemetry still in flight, or
    sent before the broker let go of it, is not the fleet's data any more, and neither is the
    Last Will the broker publishes when the control plane ends its session.
    """
    if not (records or presence or statuses):
        return 0
    with engine.begin() as conn:
        devices = {r.device_id for r in records} | {p.device_id for p in presence}
        known, revoked = _standing(conn, devices | {s.device_id for s in statuses})
        kept = sorted((r for r in records if r.device_id not in revoked), key=lambda r: (r.device_id, r.seq))
        if kept:
            conn.execute(_insert_ignoring_duplicates(conn), [_row(r) for r in kept])
        changes = _changes(kept, presence, statuses)
        device_table: Table = Device.__table__  # type: ignore[attr-defined]
        for device_id in sorted(changes.keys() & known):
            values = _update_values(device_table, changes[device_id])
            if values:
                conn.execute(update(device_table).where(device_table.c.id == device_id).values(**values))
    return len(kept)


def _standing(conn: Connection, devices: set[str]) -> tuple[set[str], set[str]]:
    """(enrolled and not revoked, revoked) among ``devices``."""
    if not devices:
        return set(), set()
    table = Device.__table__  # type: ignore[attr-defined]
    rows = conn.execute(select(table.c.id, table.c.revoked_at).where(table.c.id.in_(sorted(devices)))).all()
    revoked = {row.id for row in rows if row.revoked_at is not None}
    return {row.id for row in rows} - revoked, revoked


def _row(record: IngestRecord) -> dict[str, Any]:
    return {
        "device_id": record.device_id,
        "kind": record.kind,
        "seq": record.seq,
        "time": record.time,
        "payload": record.payload,
    }


def _changes(
    records: Iterable[IngestRecord], presence: Iterable[PresenceUpdate], statuses: Iterable[StatusUpdate]
) -> dict[str, _DeviceChange]:
    changes: dict[str, _DeviceChange] = {}
    for record in sorted(records, key=lambda r: (r.time, r.seq)):
        change = changes.setdefault(record.device_id, _DeviceChange())
        change.see(record.time)
        change.figures.update(_figures(record))
    for update_ in presence:
        change = changes.setdefault(update_.device_id, _DeviceChange())
        if change.presence is None or update_.time >= change.presence.time:
            change.presence = update_
        if update_.stamped:
            change.see(update_.time)
    for status in statuses:
        change = changes.setdefault(status.device_id, _DeviceChange())
        if status.time is not None:
            change.see(status.time)
    return changes


def _figures(record: IngestRecord) -> dict[str, Any]:
    """The device's "last figures" a record carries: decode speed and p95 latency from an
    InferenceSummary that measured them, the request count from a Heartbeat."""
    payload = record.payload
    if record.kind == "inference":
        figures: dict[str, Any] = {}
        if json_number(payload.get("tokensPerSecond")) > 0:
            figures["last_tokens_per_second"] = json_number(payload["tokensPerSecond"])
        if json_number(payload.get("requests")) > json_number(payload.get("errors")):
            figures["last_latency_ms"] = json_number(payload.get("latencyMsP95"))
        return figures
    if record.kind == "heartbeat":
        return {"requests_total": _counter(payload.get("requestsTotal"))}
    return {}


def _counter(value: Any) -> int:
    """A uint64 counter from a record (a number or a digit string) as a BIGINT: exact, not
    through a float, and never beyond the column."""
    try:
        number = int(value) if value is not None else 0
    except (TypeError, ValueError):
        return 0
    return min(max(number, 0), INT64_MAX)


def _update_values(table: Table, change: _DeviceChange) -> dict[str, Any]:
    """SET clauses for one device. Every CASE reads the row as it was before this UPDATE."""
    values: dict[str, Any] = dict(change.figures)
    if change.seen is not None:
        values["last_seen"] = _newer_or_kept(table.c.last_seen, change.seen, table.c.last_seen, change.seen)
    presence = change.presence
    if presence is not None:
        column = table.c.presence_at
        values["online"] = _newer_or_kept(
            column, presence.time, table.c.online, literal(presence.online, Boolean)
        )
        values["presence_at"] = _newer_or_kept(column, presence.time, column, presence.time)
    return values


def _newer_or_kept(stamp: Any, when: datetime, column: Any, value: Any) -> ColumnElement[Any]:
    """``value`` if ``when`` is not older than the stored ``stamp`` (or none is stored), else
    ``column`` unchanged."""
    bound = literal(when, stamp.type)
    new = literal(value, column.type) if isinstance(value, datetime) else value
    return case((or_(stamp.is_(None), stamp <= bound), new), else_=column)
