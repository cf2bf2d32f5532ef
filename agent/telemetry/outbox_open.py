"""Opening the telemetry outbox so that a damaged one never stops the agent.

A corrupt ``outbox.sqlite`` (a power cut on a bad card, a disk that lost a page) cannot be
repaired by retrying: it is moved aside with its WAL and shared-memory files, kept for
inspection (only the newest few), and a new outbox starts above every sequence number the old
one could have used, so the control plane, which keeps one record per (device, seq), accepts
what the new one sends. What the old one held is counted, when it can still be counted, and
reported by the caller. Any other failure (a full disk, a read-only file system) is an
OutboxError the caller retries later, serving meanwhile.
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from edgefleet.agent.telemetry.outbox import Outbox, OutboxCorruptError, read_seq_mark
from edgefleet.protos.fleet.fsio import fsync_dir

log = logging.getLogger(__name__)

KEEP_SET_ASIDE = 3
"""How many corrupt outboxes stay on disk for inspection; older ones are deleted."""

SIDE_FILES = ("", "-wal", "-shm")
"""SQLite's files of one database: the file itself, its write-ahead log, its shared memory."""


@dataclass(frozen=True, slots=True)
class OpenedOutbox:
    """The outbox to use, and what happened to a corrupt predecessor (None: there was none)."""

    outbox: Outbox
    set_aside: Path | None = None
    lost_records: int | None = None  # records the corrupt one held; None: it could not be read

    def describe_loss(self) -> str:
        """One line for status and telemetry; empty when nothing was set aside."""
        if self.set_aside is None:
            return ""
        held = "an unknown number of" if self.lost_records is None else str(self.lost_records)
        return f"the telemetry outbox was corrupt: moved to {self.set_aside.name}, {held} queued records lost"


def open_outbox(
    path: Path,
    *,
    keep: int = KEEP_SET_ASIDE,
    clock: Callable[[], datetime] = lambda: datetime.now(UTC),
) -> OpenedOutbox:
    """The outbox at ``path``, or a new one in its place when it is corrupt.

    Raises OutboxError for failures a retry can fix (disk full, permissions, locked)."""
    try:
        return OpenedOutbox(Outbox(path))
    except OutboxCorruptError as exc:
        log.error("%s; moving it aside and starting a new one", exc)
    lost, next_seq = _salvage(path)
    floor = max(next_seq, read_seq_mark(path), 1)
    aside = _set_aside(path, clock().strftime("%Y%m%dT%H%M%S%fZ"), keep=keep)
    outbox = Outbox(path, seq_floor=floor)
    opened = OpenedOutbox(outbox, set_aside=aside, lost_records=lost)
    log.warning("%s; the new outbox continues at seq %d", opened.describe_loss(), outbox.next_seq)
    return opened


def _salvage(path: Path) -> tuple[int | None, int]:
    """What a read-only look at the corrupt file still tells: (records held or None, next seq
    or 0). SQLite often reads the pages it needs from a partly damaged file."""
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=1.0)
    except sqlite3.Error:
        return None, 0
    try:
        try:
            held: int | None = int(conn.execute("SELECT COUNT(*) FROM outbox").fetchone()[0])
        except sqlite3.Error:
            held = None
        try:
            row = conn.execute("SELECT value FROM meta WHERE key = 'next_seq'").fetchone()
            next_seq = int(row[0]) if row is not None else 0
        except (sqlite3.Error, TypeError, ValueError):
            next_seq = 0
        return held, next_seq
    finally:
        conn.close()


def _set_aside(path: Path, stamp: str, *, keep: int) -> Path:
    """Renames the database and its side files to ``<name>.corrupt-<stamp>[-wal|-shm]`` and
    deletes all but the newest ``keep`` such sets; returns the database's new path."""
    aside = path.with_name(f"{path.name}.corrupt-{stamp}")
    for suffix in SIDE_FILES:
        source = path.with_name(path.name + suffix)
        if source.exists():
            source.replace(aside.with_name(aside.name + suffix))
    fsync_dir(path.parent)
    sets = sorted(
        p for p in path.parent.glob(f"{path.name}.corrupt-*") if not p.name.endswith(("-wal", "-shm"))
    )
    for old in sets[: max(0, len(sets) - keep)]:
        for suffix in SIDE_FILES:
            old.with_name(old.name + suffix).unlink(missing_ok=True)
    return aside
