"""What ingestion has done and whether it works: counters, stall and connection clocks.

Contract: ``IngestCounters`` is written by the network thread (received, disconnects, sessions
lost) and the writer thread (everything else), always under its ``lock``, and read by any
thread as an ``IngestStats`` snapshot (the Prometheus exporter, the health watch, tests).
``IngestClock`` holds monotonic timestamps each written by one thread (the writer: a batch
taken and a write done; the network thread: connected and disconnected) and read by any:
single attribute writes, so no lock is needed. Nothing here touches the broker or the database.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from edgefleet.controlplane.telemetry.decode import RejectReason


@dataclass(frozen=True, slots=True)
class IngestStats:
    """A snapshot of the ingestor's counters since start. ``stored`` counts telemetry messages
    written, ``rows`` the records they carried (a duplicate the database ignored counts too)."""

    received: int = 0
    stored: int = 0
    rows: int = 0
    presence: int = 0
    status: int = 0
    rejected: int = 0
    malformed: int = 0
    device_mismatch: int = 0
    bad_topic: int = 0
    oversized: int = 0
    too_many_records: int = 0
    record_too_large: int = 0
    out_of_range: int = 0
    store_failed: int = 0
    internal_error: int = 0
    write_failures: int = 0
    writer_errors: int = 0  # unexpected errors the writer survived
    clamped_times: int = 0  # records stamped too far ahead, stored at their arrival time
    dead_letter_failures: int = 0  # dead letters the database refused (acknowledged anyway)
    sessions_lost: int = 0  # reconnects that found the broker no longer held our session
    disconnects: int = 0  # connections to the broker lost (a client-id takeover included)
    dead_lettered_by_reason: Mapping[str, int] = field(default_factory=lambda: MappingProxyType({}))
    stalled_seconds: float = 0.0  # since the last successful write, while messages wait; else 0


class IngestCounters:
    """The running counts behind IngestStats; change them only while holding ``lock``."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.received = 0
        self.stored = 0
        self.rows = 0
        self.presence = 0
        self.status = 0
        self.write_failures = 0
        self.writer_errors = 0
        self.clamped_times = 0
        self.dead_letter_failures = 0
        self.sessions_lost = 0
        self.disconnects = 0
        self.rejected: dict[RejectReason, int] = dict.fromkeys(RejectReason, 0)
        self.dead_lettered: dict[RejectReason, int] = dict.fromkeys(RejectReason, 0)

    def snapshot(self, stalled_seconds: float) -> IngestStats:
        with self.lock:
            by_reason = {reason.value: count for reason, count in self.rejected.items()}
            return IngestStats(
                received=self.received,
                stored=self.stored,
                rows=self.rows,
                presence=self.presence,
                status=self.status,
                rejected=sum(self.rejected.values()),
                write_failures=self.write_failures,
                writer_errors=self.writer_errors,
                clamped_times=self.clamped_times,
                dead_letter_failures=self.dead_letter_failures,
                sessions_lost=self.sessions_lost,
                disconnects=self.disconnects,
                dead_lettered_by_reason=MappingProxyType(
                    {reason.value: count for reason, count in self.dead_lettered.items()}
                ),
                stalled_seconds=stalled_seconds,
                **by_reason,
            )


class IngestClock:
    """When the writer last took a batch and last wrote one, and since when the broker has been
    out of reach (monotonic seconds)."""

    def __init__(self) -> None:
        self._batch_taken: float | None = None  # None: the writer holds no batch
        self._last_write = time.monotonic()
        self._disconnected_at: float | None = time.monotonic()  # None while connected

    def batch_taken(self) -> None:
        self._batch_taken = time.monotonic()

    def batch_done(self) -> None:
        self._batch_taken = None

    def wrote(self) -> None:
        self._last_write = time.monotonic()

    def connected(self) -> None:
        self._disconnected_at = None

    def disconnected(self) -> None:
        """The connection was lost (or is being made): the first loss since connected counts."""
        if self._disconnected_at is None:
            self._disconnected_at = time.monotonic()

    def connecting(self) -> None:
        """A (re)start: out of reach from now until connected."""
        self._disconnected_at = time.monotonic()

    def stalled_seconds(self, *, waiting: bool) -> float:
        """Seconds since the last successful write while messages wait for the writer (0 when
        none waits, ``waiting`` says whether any is queued): grows while the database is out
        of reach or the writer is gone."""
        taken = self._batch_taken
        if taken is None and not waiting:
            return 0.0
        since = max(taken if taken is not None else 0.0, self._last_write)
        return max(0.0, time.monotonic() - since)

    def disconnected_seconds(self) -> float:
        """Seconds since the broker connection was lost (or not yet made); 0 while connected."""
        since = self._disconnected_at
        return 0.0 if since is None else time.monotonic() - since
