"""The supervised batch writer: decoded messages into the database with group commit.

Contract (runs on the ingestor's one writer thread; nothing else calls into it but ``run``):
- group commit: the writer takes everything that queued up in the ``Inbox`` while the previous
  write ran (up to ``batch_size`` messages and ``MAX_BATCH_BYTES`` of payload), so a burst
  becomes a few large inserts and a trickle is written immediately. No message waits for a
  timer; ``flush_interval`` is only how often an idle writer looks whether it should stop.
- at-least-once: a batch is acknowledged (``ack``, in arrival order) only after its commit.
  Only a database out of reach (OperationalError and the like, ``_unreachable``) leaves a batch
  unacknowledged; it is retried with jittered backoff until it works or ingestion stops, and the
  broker redelivers whatever is left unacknowledged. The store ignores a repeated
  (device_id, seq), so redeliveries are harmless.
- nothing a device sends stops the writer: a message ``decode`` refuses, or one the database
  still refuses (a refused batch is split in halves down to the message at fault, so the rest
  is stored), is acknowledged, counted by reason, logged and kept in the dead-letter table
  (``dead_letter``: reason, detail, size, sha256 and at most ``EXCERPT_BYTES`` of the payload).
- supervised: any other error while writing is a bug; it is logged and counted
  (``writer_errors``), the batch in hand dead-lettered as INTERNAL_ERROR and acknowledged, and
  the writer carries on.
Decoding happens here, not on the network thread (see ``TelemetryIngestor._on_message``).
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeAlias

from sqlalchemy.engine import Engine
from sqlalchemy.exc import DisconnectionError, InterfaceError, OperationalError, SQLAlchemyError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception_type,
    sleep_using_event,
    stop_when_event_set,
    wait_exponential,
    wait_random,
)

from edgefleet.controlplane.store.telemetry import (
    DeadLetter,
    IngestRecord,
    PresenceUpdate,
    StatusUpdate,
    store_batch,
    store_dead_letters,
)
from edgefleet.controlplane.telemetry.decode import (
    MAX_MESSAGE_BYTES,
    Decoded,
    RejectedMessage,
    RejectReason,
    TelemetryBatch,
    decode,
)
from edgefleet.controlplane.telemetry.inbox import EXCERPT_BYTES, Inbound, Inbox
from edgefleet.controlplane.telemetry.ingest_health import IngestClock, IngestCounters

logger = logging.getLogger(__name__)

MAX_BATCH_BYTES = 4 * 1024 * 1024
"""Payload bytes decoded and written in one transaction at most (the agent's 10-record
messages, ~3 KiB, reach the 500-message batch size first)."""


@dataclass
class _Split:
    """A batch of decoded messages sorted by what they carry, for one database transaction."""

    records: list[IngestRecord]
    presence: list[PresenceUpdate]
    statuses: list[StatusUpdate]
    messages: int  # telemetry messages among them
    clamped: int  # records among them whose time was clamped

    @classmethod
    def of(cls, items: list[Decoded]) -> _Split:
        split = cls([], [], [], 0, 0)
        for item in items:
            if isinstance(item, TelemetryBatch):
                split.records.extend(item.records)
                split.messages += 1
                split.clamped += item.clamped
            elif isinstance(item, PresenceUpdate):
                split.presence.append(item)
            elif isinstance(item, StatusUpdate):
                split.statuses.append(item)
        return split

    def __bool__(self) -> bool:
        return bool(self.records or self.presence or self.statuses)


_Storable: TypeAlias = tuple[Inbound, Decoded]


def _unreachable(exc: BaseException) -> bool:
    """Whether a failed write says the database is out of reach (retry the batch later) rather
    than that it refused what was in the batch (find the message at fault)."""
    return isinstance(exc, OperationalError | InterfaceError | DisconnectionError | PoolTimeout) or bool(
        getattr(exc, "connection_invalidated", False)
    )


def dead_letter(inbound: Inbound, reason: RejectReason, detail: str) -> DeadLetter:
    """The dead-letter row of a message: never its whole payload, only an excerpt."""
    device_id = ""
    parts = inbound.topic.split("/")
    if len(parts) > 3 and parts[:3] == ["fleet", "v1", "devices"]:
        device_id = parts[3]
    payload = bytes(inbound.payload[:EXCERPT_BYTES])
    return DeadLetter(
        received_at=inbound.arrived,
        topic=inbound.topic,
        device_id=device_id,
        reason=reason.value,
        detail=detail,
        payload_bytes=inbound.size,
        payload_sha256=hashlib.sha256(inbound.payload).hexdigest()
        if inbound.size <= MAX_MESSAGE_BYTES
        else "",
        excerpt=payload,
    )


class BatchWriter:
    """Takes batches from ``inbox``, stores them through ``engine`` and acknowledges them
    through ``ack``; ``run`` is the writer thread's body and returns once ``stopping`` is set
    and what had arrived by then is written (or the database is out of reach)."""

    def __init__(
        self,
        *,
        engine: Engine,
        inbox: Inbox,
        ack: Callable[[list[Inbound]], None],
        counters: IngestCounters,
        clock: IngestClock,
        stopping: threading.Event,
        batch_size: int,
        flush_interval: float,
    ) -> None:
        self._engine = engine
        self._inbox = inbox
        self._ack = ack
        self._counters = counters
        self._clock = clock
        self._stopping = stopping
        self._batch_size = batch_size
        self._flush_interval = flush_interval

    def run(self) -> None:
        """The writer loop, supervised: an unexpected error is logged and counted and the loop
        carries on (a bug must not end ingestion for every device)."""
        while not self._stopping.is_set():
            try:
                batch = self._next_batch(wait=self._flush_interval)
                if batch:
                    self._write_supervised(batch, retry=True)
            except Exception:
                self._count_writer_error()
                logger.exception("telemetry writer failed; carrying on")
                self._stopping.wait(self._flush_interval)
        # One last pass over what had arrived when stop() was called, so a clean stop leaves
        # little to redeliver; bounded by that count, since messages keep coming until we disconnect.
        left = self._inbox.waiting()
        while left > 0:
            batch = self._next_batch(wait=0.0, limit=left)
            if not batch or not self._write_supervised(batch, retry=False):
                return
            left -= len(batch)

    def _count_writer_error(self) -> None:
        with self._counters.lock:
            self._counters.writer_errors += 1

    def _next_batch(self, *, wait: float, limit: int | None = None) -> list[Inbound]:
        size = self._batch_size if limit is None else min(limit, self._batch_size)
        return self._inbox.take(max_messages=size, max_bytes=MAX_BATCH_BYTES, wait=wait)

    def _write_supervised(self, batch: list[Inbound], *, retry: bool) -> bool:
        """``_write``, and if it fails unexpectedly, the batch dead-lettered and acknowledged
        so the broker does not hand it to us again and again."""
        self._clock.batch_taken()
        try:
            return self._write(batch, retry=retry)
        except Exception as exc:
            self._count_writer_error()
            with self._counters.lock:
                self._counters.rejected[RejectReason.INTERNAL_ERROR] += len(batch)
            logger.exception("telemetry writer failed on %d messages; dead-lettering them", len(batch))
            letters = [dead_letter(item, RejectReason.INTERNAL_ERROR, repr(exc)) for item in batch]
            try:
                self._keep_dead_letters(letters)
            except Exception:
                logger.exception("could not keep %d dead letters", len(letters))
            self._ack(batch)
            return True
        finally:
            self._clock.batch_done()
            self._inbox.release(sum(len(item.payload) for item in batch))

    def _write(self, batch: list[Inbound], *, retry: bool) -> bool:
        """Stores and acknowledges a batch; False if the database could not be reached (left
        unacknowledged). Messages refused on their own go to the dead-letter table."""
        storable: list[_Storable] = []
        letters: list[DeadLetter] = []
        for inbound in batch:
            try:
                decoded = _decoded(inbound)
            except RejectedMessage as exc:
                self._reject(inbound, exc.reason, str(exc), letters)
                continue
            if decoded is not None:
                storable.append((inbound, decoded))
        try:
            if retry:
                self._with_retry(lambda: self._store_isolating(storable, letters))
            else:
                self._store_isolating(storable, letters)
        except SQLAlchemyError:
            with self._counters.lock:
                self._counters.write_failures += 1
            logger.exception(
                "leaving %d telemetry messages unacknowledged; the broker resends them", len(batch)
            )
            return False
        self._clock.wrote()
        self._ack(batch)
        return True

    def _reject(self, inbound: Inbound, reason: RejectReason, detail: str, letters: list[DeadLetter]) -> None:
        with self._counters.lock:
            self._counters.rejected[reason] += 1
        logger.warning("rejected telemetry (%s): %s", reason.value, detail[:1000])
        letters.append(dead_letter(inbound, reason, detail))

    def _store_isolating(self, storable: list[_Storable], letters: list[DeadLetter]) -> None:
        """Stores what decoded, finds the messages the database refuses (dead-lettered with
        the rest of the refused ones), and keeps the dead letters. Raises only when the
        database is out of reach, so the caller retries the whole batch."""
        refused = list(letters)
        for inbound, exc in self._store_or_split(storable):
            self._reject(inbound, RejectReason.STORE_FAILED, f"{type(exc).__name__}: {exc}", refused)
        self._keep_dead_letters(refused)

    def _store_or_split(self, storable: list[_Storable]) -> list[tuple[Inbound, Exception]]:
        """Stores ``storable`` in one transaction, or if the database refuses it, each half
        in turn, down to the single messages at fault, which are returned. Only the database's
        refusals (SQLAlchemyError) are isolated: any other exception is a bug, raised to
        ``_write_supervised``, which dead-letters the whole batch as INTERNAL_ERROR."""
        if not storable:
            return []
        split = _Split.of([decoded for _, decoded in storable])
        try:
            self._store(split)
        except SQLAlchemyError as exc:
            if _unreachable(exc):
                raise
            if len(storable) == 1:
                logger.warning(
                    "the database refused a telemetry message on %s: %s", storable[0][0].topic, exc
                )
                return [(storable[0][0], exc)]
            middle = len(storable) // 2
            return self._store_or_split(storable[:middle]) + self._store_or_split(storable[middle:])
        with self._counters.lock:
            self._counters.stored += split.messages
            self._counters.rows += len(split.records)
            self._counters.presence += len(split.presence)
            self._counters.status += len(split.statuses)
            self._counters.clamped_times += split.clamped
        return []

    def _keep_dead_letters(self, letters: list[DeadLetter]) -> None:
        """Writes dead letters; one the database refuses anyway is logged, counted and given up
        (it is acknowledged all the same: it must never block the rest)."""
        if not letters:
            return
        try:
            store_dead_letters(self._engine, letters)
        except Exception as exc:
            if _unreachable(exc):
                raise
            with self._counters.lock:
                self._counters.dead_letter_failures += len(letters)
            logger.exception("the database refused %d dead letters; dropping them", len(letters))
            return
        with self._counters.lock:
            for letter in letters:
                self._counters.dead_lettered[RejectReason(letter.reason)] += 1

    def _store(self, split: _Split) -> None:
        if split:
            store_batch(self._engine, records=split.records, presence=split.presence, statuses=split.statuses)

    def _with_retry(self, write: Any) -> None:
        """Retries a database out of reach with jittered backoff until it works or we are stopping."""

        def log_retry(state: RetryCallState) -> None:
            with self._counters.lock:
                self._counters.write_failures += 1
            exc = state.outcome.exception() if state.outcome is not None else None
            logger.warning("telemetry write failed (attempt %d): %s; retrying", state.attempt_number, exc)

        for attempt in Retrying(
            retry=retry_if_exception_type(SQLAlchemyError),
            wait=wait_exponential(multiplier=0.1, max=10.0) + wait_random(0, 0.5),
            stop=stop_when_event_set(self._stopping),
            sleep=sleep_using_event(self._stopping),
            before_sleep=log_retry,
            reraise=True,
        ):
            with attempt:
                write()


def _decoded(inbound: Inbound) -> Decoded | None:
    """The message decoded; None for an empty retained payload. RejectedMessage when it
    cannot be stored; any other exception is a bug, reported as INTERNAL_ERROR."""
    if inbound.size > MAX_MESSAGE_BYTES:
        raise RejectedMessage(
            RejectReason.OVERSIZED,
            f"{inbound.size} bytes on {inbound.topic[:200]}, more than {MAX_MESSAGE_BYTES}",
        )
    try:
        return decode(inbound.topic, inbound.payload, arrived=inbound.arrived)
    except RejectedMessage:
        raise
    except Exception as exc:  # a bug here must not stop ingestion
        logger.exception("could not decode telemetry message %d on %s", inbound.mid, inbound.topic[:200])
        raise RejectedMessage(RejectReason.INTERNAL_ERROR, f"decoding failed: {exc!r}") from exc
