"""The publisher's ledger between the outbox and the broker: which records are in flight in
which message, and what each PUBACK means for them.

Records leave the outbox only when the PUBACK for the message carrying them says the broker
has them; a v5 PUBACK saying "no matching subscribers" or refusing the message leaves them in
the outbox and backs off before resending, and a record refused ``MAX_REFUSALS`` times in a row
is discarded, since resending it forever would hold up the rest. Kept apart from the MQTT
connection (edgefleet.agent.telemetry.publisher) because this is pure bookkeeping over the
outbox: one owner (the drain thread), no paho call, and the acknowledgements paho's network
thread reports arrive through a thread-safe deque.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from paho.mqtt.reasoncodes import ReasonCode

from edgefleet.agent.telemetry.outbox import Outbox, OutboxError, OutboxItem, batch_size, encode_batch
from edgefleet.protos.fleet.topics import TopicKind

logger = logging.getLogger(__name__)

MAX_REFUSALS = 5  # a record the broker refused this often in a row is discarded
RETRY_BACKOFF_S = (1.0, 30.0)  # after a refusal or a PUBACK saying nobody subscribes
NO_MATCHING_SUBSCRIBERS = 0x10  # MQTT v5 PUBACK reason code


@dataclass(frozen=True, slots=True)
class Batch:
    """Consecutive outbox records of one kind that go out as one PUBLISH."""

    kind: TopicKind
    seqs: tuple[int, ...]
    payload: bytes


def batch_records(items: Iterable[OutboxItem], *, max_records: int, max_bytes: int) -> list[Batch]:
    """Groups records, oldest first, into batches of consecutive records of one kind.

    A batch closes when the kind changes, at ``max_records`` records, or before the encoded
    array would exceed ``max_bytes``; a single record larger than that still goes out alone
    (the caller decides whether the broker can take it). Pure, for unit tests.
    """
    batches: list[Batch] = []
    run: list[OutboxItem] = []
    run_bytes = 0

    def close() -> None:
        if run:
            payload = encode_batch([item.payload for item in run])
            batches.append(Batch(run[0].kind, tuple(item.seq for item in run), payload))

    for item in items:
        fits = batch_size(run_bytes + len(item.payload), len(run) + 1) <= max_bytes
        if run and (item.kind is not run[0].kind or len(run) >= max_records or not fits):
            close()
            run, run_bytes = [], 0
        run.append(item)
        run_bytes += len(item.payload)
    close()
    return batches


class OutboxDrain:
    """What is in flight and what the broker answered; only the drain thread calls it, except
    ``acknowledge`` (paho's network thread, under paho's lock: a deque append and nothing else).

    ``reset()`` starts a new session (a publisher start) and keeps the counters.
    """

    def __init__(self, outbox: Outbox, reread: threading.Event) -> None:
        self._outbox = outbox
        self._reread = reread  # set: the next pass reads the outbox from the start
        self._acks: deque[tuple[int, ReasonCode]] = deque()
        self.inflight: dict[int, Batch] = {}  # mid -> batch paho holds
        self.busy: set[int] = set()  # seqs in flight, or acked and not yet deleted
        self.cursor = 0  # highest seq handed to paho in this pass over the outbox
        self.resume_at = 0.0  # after a refusal: publish nothing new before this (monotonic)
        self._acked: list[int] = []  # seqs to delete from the outbox
        self._refusals: dict[int, int] = {}  # seq -> PUBACKs refusing it in a row
        self._backoff_s = 0.0
        self.acknowledged = 0
        self.discarded = 0

    def reset(self) -> None:
        self._acks.clear()
        self.inflight, self.busy, self._acked, self._refusals = {}, set(), [], {}
        self.cursor, self.resume_at, self._backoff_s = 0, 0.0, 0.0

    def inflight_records(self) -> int:
        return sum(len(batch.seqs) for batch in self.inflight.values())

    def acknowledge(self, mid: int, reason_code: ReasonCode) -> None:
        """A PUBACK arrived (paho's network thread); ``settle`` applies it."""
        self._acks.append((mid, reason_code))

    def sent(self, mid: int, batch: Batch) -> None:
        """Paho took ``batch`` as message ``mid``."""
        self.inflight[mid] = batch
        self.busy.update(batch.seqs)

    def settle(self) -> None:
        """Applies the PUBACKs received so far and deletes acknowledged records from the outbox."""
        unheard: list[Batch] = []
        refused: list[tuple[Batch, ReasonCode]] = []
        while self._acks:
            mid, reason_code = self._acks.popleft()
            batch = self.inflight.pop(mid, None)
            if batch is None:
                continue  # a presence or status message: nothing to delete
            if reason_code.is_failure:
                refused.append((batch, reason_code))
            elif reason_code.value == NO_MATCHING_SUBSCRIBERS:
                unheard.append(batch)
            else:
                self._acked.extend(batch.seqs)
                self._backoff_s = 0.0
        if refused:
            self._refused(refused)
        if unheard:
            self._unheard(unheard)
        self._flush_acked()

    def discard(self, seqs: Sequence[int]) -> None:
        """Removes records the broker will never take from the outbox (counted in ``discarded``)."""
        for seq in seqs:
            self._refusals.pop(seq, None)
        self.discarded += self._outbox.discard(seqs)

    def _flush_acked(self) -> None:
        acked, self._acked = self._acked, []
        if not acked:
            return
        try:
            self._outbox.ack_many(acked)
        except OutboxError:
            logger.exception("could not delete %d acknowledged records; they will be resent", len(acked))
        finally:
            self.busy.difference_update(acked)
            for seq in acked:
                self._refusals.pop(seq, None)
        self.acknowledged += len(acked)

    def _unheard(self, unheard: list[Batch]) -> None:
        """The broker took messages nobody subscribes to (v5 PUBACK 0x10): no control plane has
        a session on it, e.g. Mosquitto 2.0.11 after a restart, which does not restore shared
        subscriptions until the replicas subscribe again. Delivered to nobody is not delivered:
        the records stay in the outbox and go out again after a backoff."""
        for batch in unheard:
            self.busy.difference_update(batch.seqs)
        records = sum(len(batch.seqs) for batch in unheard)
        self._back_off(f"no control plane subscribes yet; {records} records wait")

    def _refused(self, refused: list[tuple[Batch, ReasonCode]]) -> None:
        """A v5 broker refused messages (3.1.1 brokers cannot say so). Their records stay in the
        outbox and go out again after a backoff, unless they were refused too often: then they
        are discarded, since resending them forever would only hold up the rest."""
        hopeless: list[int] = []
        for batch, reason_code in refused:
            logger.warning(
                "broker refused a %s message of %d records: %s",
                batch.kind.value,
                len(batch.seqs),
                reason_code,
            )
            self.busy.difference_update(batch.seqs)
            for seq in batch.seqs:
                self._refusals[seq] = self._refusals.get(seq, 0) + 1
                if self._refusals[seq] >= MAX_REFUSALS:
                    hopeless.append(seq)
        if hopeless:
            logger.error("discarding %d records the broker refused %d times", len(hopeless), MAX_REFUSALS)
            self.discard(hopeless)
        self._back_off("the broker refused telemetry")

    def _back_off(self, why: str) -> None:
        """Publishes nothing new for a while, then re-reads the outbox from the start."""
        low, high = RETRY_BACKOFF_S
        self._backoff_s = min(high, max(low, self._backoff_s * 2))
        self.resume_at = time.monotonic() + self._backoff_s
        self._reread.set()
        logger.warning("%s; resending in %.0f s", why, self._backoff_s)
