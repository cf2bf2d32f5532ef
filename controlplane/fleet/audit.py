"""The audit trail: who changed what in the fleet, when, and with what outcome.

Entries form a hash chain: each stores the hash of its predecessor and a hash over its own
fields and that link, so editing or deleting a row breaks verification from that row on.
Entries are written in the same transaction as the change they describe, so a change and
its record land together or not at all.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import text
from sqlmodel import Session, col, select

from edgefleet.controlplane.store.models import AuditEntry, utcnow
from edgefleet.controlplane.store.values import as_utc

GENESIS = "0" * 64
# Column bounds of AuditEntry (PostgreSQL refuses longer strings) and of one entry's detail:
# what a caller sent is recorded, cut to these, never refused for its size here.
MAX_ACTOR = 128
MAX_ACTION = 64
MAX_TARGET = 256
MAX_DETAIL_BYTES = 64 * 1024
DETAIL_HEAD_CHARS = 4096


class Outcome:
    """Outcome values, shared by writers and filters."""

    OK = "ok"
    REFUSED = "refused"
    FAILED = "failed"


def entry_hash(
    *,
    seq: int,
    time: datetime,
    actor: str,
    action: str,
    target: str,
    outcome: str,
    detail: dict[str, Any],
    prev: str,
) -> str:
    """Hash over every field and the predecessor's hash, in a canonical encoding."""
    canonical = json.dumps(
        {
            "seq": seq,
            "time": as_utc(time).isoformat(timespec="microseconds"),
            "actor": actor,
            "action": action,
            "target": target,
            "outcome": outcome,
            "detail": detail,
            "prev": prev,
        },
        sort_keys=True,
        separators=(",", ":"),
    )
    return hashlib.sha256(canonical.encode()).hexdigest()


def _short(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def bounded_detail(detail: dict[str, Any]) -> dict[str, Any]:
    """``detail`` itself when its JSON is at most MAX_DETAIL_BYTES, else the start of that JSON
    text and its size: an entry records what happened, not every byte a caller sent."""
    encoded = json.dumps(detail, sort_keys=True, default=str)
    if len(encoded.encode()) <= MAX_DETAIL_BYTES:
        return detail
    return {"truncated": True, "bytes": len(encoded.encode()), "head": encoded[:DETAIL_HEAD_CHARS]}


def record(
    session: Session,
    *,
    actor: str,
    action: str,
    target: str,
    outcome: str = Outcome.OK,
    detail: dict[str, Any] | None = None,
) -> AuditEntry:
    """Appends one entry to the chain inside the caller's transaction; strings longer than
    their columns are cut, a detail over MAX_DETAIL_BYTES is kept as its start (``bounded_detail``)."""
    actor, action, target = _short(actor, MAX_ACTOR), _short(action, MAX_ACTION), _short(target, MAX_TARGET)
    if session.get_bind().dialect.name == "postgresql":
        # Serialize appenders across replicas: the chain has exactly one head.
        session.execute(text("SELECT pg_advisory_xact_lock(7245001)"))
    last = session.exec(select(AuditEntry).order_by(col(AuditEntry.seq).desc()).limit(1)).first()
    seq = (last.seq + 1) if last else 1
    prev = last.hash if last else GENESIS
    now = utcnow()
    fields = bounded_detail(detail or {})
    entry = AuditEntry(
        seq=seq,
        time=now,
        actor=actor,
        action=action,
        target=target,
        outcome=outcome,
        detail=fields,
        prev_hash=prev,
        hash=entry_hash(
            seq=seq,
            time=now,
            actor=actor,
            action=action,
            target=target,
            outcome=outcome,
            detail=fields,
            prev=prev,
        ),
    )
    session.add(entry)
    session.flush()
    return entry


def list_entries(
    session: Session,
    *,
    actor: str | None = None,
    action: str | None = None,
    target: str | None = None,
    since: datetime | None = None,
    limit: int = 100,
    before: int | None = None,
) -> Sequence[AuditEntry]:
    """Matching entries, newest first; with ``before``, only those older than that seq."""
    query = select(AuditEntry)
    if before is not None:
        query = query.where(col(AuditEntry.seq) < before)
    if actor:
        query = query.where(AuditEntry.actor == actor)
    if action:
        query = query.where(AuditEntry.action == action)
    if target:
        query = query.where(AuditEntry.target == target)
    if since:
        query = query.where(AuditEntry.time >= since)
    return session.exec(query.order_by(col(AuditEntry.seq).desc()).limit(limit)).all()


@dataclass(frozen=True, slots=True)
class Verification:
    entries: int
    head: str
    broken_at: int | None = None
    reason: str = ""

    @property
    def ok(self) -> bool:
        return self.broken_at is None


def verify_chain(entries: Iterable[AuditEntry]) -> Verification:
    """Walks the chain oldest first; the first edited, deleted or reordered entry breaks it."""
    prev, expected_seq, count = GENESIS, 1, 0
    for entry in entries:
        count += 1
        if entry.seq != expected_seq:
            return Verification(count, prev, entry.seq, f"entry {expected_seq} is missing")
        if entry.prev_hash != prev:
            return Verification(count, prev, entry.seq, "link to the previous entry does not match")
        recomputed = entry_hash(
            seq=entry.seq,
            time=entry.time,
            actor=entry.actor,
            action=entry.action,
            target=entry.target,
            outcome=entry.outcome,
            detail=entry.detail,
            prev=entry.prev_hash,
        )
        if recomputed != entry.hash:
            return Verification(count, prev, entry.seq, "entry was modified after it was written")
        prev, expected_seq = entry.hash, expected_seq + 1
    return Verification(count, prev)


def verify(session: Session) -> Verification:
    return verify_chain(session.exec(select(AuditEntry).order_by(col(AuditEntry.seq))))
