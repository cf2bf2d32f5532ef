"""Reading stored telemetry for operators: a page of rows newest first, and the two queries
TailTelemetry polls with. Writing it is ``store.telemetry``'s.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlmodel import Session, col, func, select

from edgefleet.controlplane.store.models import TelemetryRecord

TAIL_BATCH_ROWS = 500


def _matching(query: Any, *, device_id: str | None, kind: str | None) -> Any:
    if device_id:
        query = query.where(TelemetryRecord.device_id == device_id)
    if kind:
        query = query.where(TelemetryRecord.kind == kind)
    return query


def query_telemetry(
    session: Session, *, device_id: str | None, kind: str | None, limit: int, before: int | None = None
) -> Sequence[TelemetryRecord]:
    """The newest matching records first, older than record id ``before`` when given."""
    query = _matching(select(TelemetryRecord), device_id=device_id, kind=kind)
    if before is not None:
        query = query.where(col(TelemetryRecord.id) < before)
    rows: Sequence[TelemetryRecord] = session.exec(
        query.order_by(col(TelemetryRecord.id).desc()).limit(limit)
    ).all()
    return rows


def tail_start(
    session: Session, *, device_id: str | None, kind: str | None, backlog: int
) -> tuple[int, list[TelemetryRecord]]:
    """The id of the newest stored row (of any device and kind: where the tail starts) and the
    ``backlog`` newest matching rows up to it, oldest first."""
    newest = session.exec(select(func.max(TelemetryRecord.id))).one() or 0
    if not backlog:
        return newest, []
    query = _matching(
        select(TelemetryRecord).where(col(TelemetryRecord.id) <= newest), device_id=device_id, kind=kind
    )
    rows = session.exec(query.order_by(col(TelemetryRecord.id).desc()).limit(backlog)).all()
    return newest, list(reversed(rows))


def tail_after(
    session: Session, *, after: int, device_id: str | None, kind: str | None
) -> list[TelemetryRecord]:
    """Up to TAIL_BATCH_ROWS matching rows stored after row ``after``, in id order."""
    query = _matching(
        select(TelemetryRecord).where(col(TelemetryRecord.id) > after), device_id=device_id, kind=kind
    )
    return list(session.exec(query.order_by(col(TelemetryRecord.id)).limit(TAIL_BATCH_ROWS)).all())
