"""The hand-off between the MQTT network thread and the writer thread: flow control.

Contract: one producer (paho's network thread, ``put``) and one consumer (the writer thread,
``take`` then ``release``). The inbox is bounded twice, by messages (``max_messages``: one batch
being written, the next one arriving) and by payload bytes (``MAX_QUEUED_BYTES``). When either
bound is reached ``put`` blocks the network thread, which then stops reading the socket, and TCP
leaves the backlog in the broker, where it is safe: memory stays bounded after any outage, and
a flood of large messages stays in the broker, not here. A message is never dropped silently:
``put`` gives up only when ingestion is stopping, and counts it (``abandoned``) so ``stop`` can
tell that not everything received was written (the broker redelivers it, unacknowledged).

A payload longer than ``MAX_MESSAGE_BYTES`` is cut to its excerpt as it arrives
(``Inbound.received``): it will be refused, and only the excerpt is kept for its dead letter.
"""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass
from datetime import UTC, datetime

import paho.mqtt.client as mqtt

from edgefleet.controlplane.telemetry.decode import MAX_MESSAGE_BYTES

MAX_QUEUED_BYTES = 32 * 1024 * 1024
"""Payload bytes waiting for the writer at most; beyond it the network thread waits."""
EXCERPT_BYTES = 512
"""What the dead-letter table keeps of a refused payload."""


@dataclass(frozen=True, slots=True)
class Inbound:
    """One received message in arrival order, still undecoded. An oversized payload is kept
    only as its excerpt; ``size`` is what arrived."""

    topic: str
    payload: bytes | bytearray
    arrived: datetime
    mid: int
    qos: int
    connection: int  # which connection it arrived on: a mid is only meaningful there
    size: int

    @classmethod
    def received(cls, message: mqtt.MQTTMessage, connection: int) -> Inbound:
        """The message as it arrived on ``connection``, stamped now; cheap (network thread)."""
        payload = message.payload
        size = len(payload)
        if size > MAX_MESSAGE_BYTES:
            payload = bytes(payload[:EXCERPT_BYTES])
        return cls(
            topic=message.topic,
            payload=payload,
            arrived=datetime.now(UTC),
            mid=message.mid,
            qos=message.qos,
            connection=connection,
            size=size,
        )


class Inbox:
    """Messages waiting for the writer, bounded by count and by payload bytes."""

    def __init__(self, *, max_messages: int, stopping: threading.Event, poll_s: float) -> None:
        """``stopping`` ends every wait (checked every ``poll_s`` seconds)."""
        self._queue: queue.Queue[Inbound] = queue.Queue(maxsize=max_messages)
        self._stopping = stopping
        self._poll_s = poll_s
        self._room = threading.Condition()
        self._queued_bytes = 0
        self._abandoned = 0

    def put(self, inbound: Inbound) -> bool:
        """Queues a message, waiting for room (network thread). False if ingestion stopped
        first: the message is left unacknowledged and counted in ``abandoned``."""
        size = len(inbound.payload)
        if self._reserve(size):
            while not self._stopping.is_set():
                try:
                    self._queue.put(inbound, timeout=self._poll_s)
                    return True
                except queue.Full:
                    continue  # the writer is behind (or the database down): wait for room
            self.release(size)
        with self._room:
            self._abandoned += 1
        return False

    def take(self, *, max_messages: int, max_bytes: int, wait: float) -> list[Inbound]:
        """Up to ``max_messages`` messages and about ``max_bytes`` of payload, oldest first,
        waiting ``wait`` seconds for the first (writer thread); [] if none came. Their bytes
        stay counted until ``release``."""
        try:
            first = self._queue.get(timeout=wait) if wait > 0 else self._queue.get_nowait()
        except queue.Empty:
            return []
        batch = [first]
        taken = len(first.payload)
        # Bytes bound a batch too: decoded, a payload takes several times its size in objects.
        while len(batch) < max_messages and taken < max_bytes:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            batch.append(item)
            taken += len(item.payload)
        return batch

    def release(self, size: int) -> None:
        """Gives back ``size`` payload bytes once the messages holding them are dealt with."""
        with self._room:
            self._queued_bytes -= size
            self._room.notify_all()

    def waiting(self) -> int:
        """Messages queued and not yet taken."""
        return self._queue.qsize()

    def drained(self) -> bool:
        """Whether every message received was taken (none waits, none was abandoned)."""
        with self._room:
            return self._queue.empty() and self._abandoned == 0

    def _reserve(self, size: int) -> bool:
        """Waits until ``size`` more payload bytes fit the budget; False if stopping."""
        with self._room:
            while self._queued_bytes > 0 and self._queued_bytes + size > MAX_QUEUED_BYTES:
                if self._stopping.is_set():
                    return False
                self._room.wait(self._poll_s)
            self._queued_bytes += size
            return True
