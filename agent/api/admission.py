"""A bounded queue in front of the model: a few requests run, a few wait, the rest get 429.

An edge device decodes one request at a time well and many at once badly (they share the
same cores and the runtime serializes them anyway), and unbounded waiting turns a burst into
minutes of latency for everyone plus requests whose clients gave up long ago. So at most
`max_running` requests hold a slot, at most `max_waiting` wait for one in arrival order, and
anyone beyond that is told at once to come back later (HTTP 429 with Retry-After, which the
OpenAI SDKs honour).

The limits can change while requests wait (a signed device config does): nobody already
admitted or waiting is turned away; a raised ``max_running`` admits waiters at once, a lowered
one takes effect as running requests finish, and a lowered ``max_waiting`` only refuses newcomers
until the line is short enough.

Slots are released from whichever thread finishes the work (the generation thread, usually),
so the bookkeeping sits behind a threading lock and waiters are woken through their loop.
"""

from __future__ import annotations

import asyncio
import math
import threading
import time
from collections import deque
from dataclasses import dataclass

MAX_RETRY_AFTER_S = 60  # the OpenAI SDKs ignore longer Retry-After values and use their own backoff


@dataclass(frozen=True, slots=True)
class QueueLimits:
    """How many requests may run at once and how many may wait for a slot."""

    max_running: int = 1  # one per loaded model: the device serves one model
    max_waiting: int = 16

    def __post_init__(self) -> None:
        if self.max_running < 1:
            raise ValueError("max_running must be at least 1")
        if self.max_waiting < 0:
            raise ValueError("max_waiting must not be negative")


class QueueFull(Exception):
    """Every slot is taken and the waiting line is full."""

    def __init__(self, *, retry_after_s: int, waiting: int) -> None:
        self.retry_after_s = retry_after_s
        super().__init__(
            f"the device is busy ({waiting} requests already waiting); retry in {retry_after_s}s"
        )


class _Waiter:
    __slots__ = ("future", "granted", "loop")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.future: asyncio.Future[None] = loop.create_future()
        self.granted = False


class Slot:
    """The right to run one request; release exactly once, from any thread (extra calls do nothing)."""

    __slots__ = ("_acquired_at", "_lock", "_queue", "_released")

    def __init__(self, queue: AdmissionQueue) -> None:
        self._queue = queue
        self._acquired_at = time.monotonic()
        self._lock = threading.Lock()
        self._released = False

    def release(self) -> None:
        with self._lock:
            if self._released:
                return
            self._released = True
        self._queue._release(time.monotonic() - self._acquired_at)


class AdmissionQueue:
    """FIFO admission with a bounded waiting line; counts what it turned away."""

    _EWMA_WEIGHT = 0.2  # how fast the Retry-After estimate follows recent request durations

    def __init__(self, limits: QueueLimits | None = None) -> None:
        self.limits = limits or QueueLimits()
        self._lock = threading.Lock()
        self._running = 0
        self._waiters: deque[_Waiter] = deque()
        self._rejected = 0
        self._mean_hold_s: float | None = None

    def set_limits(self, limits: QueueLimits) -> None:
        """Applies new limits without dropping anyone (see the module docstring)."""
        with self._lock:
            self.limits = limits
            granted = []
            while self._waiters and self._running < limits.max_running:
                waiter = self._waiters.popleft()
                waiter.granted = True
                self._running += 1
                granted.append(waiter)
        for waiter in granted:
            self._wake(waiter)

    @property
    def running(self) -> int:
        with self._lock:
            return self._running

    @property
    def waiting(self) -> int:
        with self._lock:
            return len(self._waiters)

    @property
    def rejected(self) -> int:
        """Requests turned away with 429 since the queue was made."""
        with self._lock:
            return self._rejected

    async def admit(self) -> Slot:
        """Wait for a slot (cancellable: a cancelled waiter leaves the line); raise QueueFull."""
        loop = asyncio.get_running_loop()
        with self._lock:
            if self._running < self.limits.max_running and not self._waiters:
                self._running += 1
                return Slot(self)
            if len(self._waiters) >= self.limits.max_waiting:
                self._rejected += 1
                raise QueueFull(retry_after_s=self._retry_after_locked(), waiting=len(self._waiters))
            waiter = _Waiter(loop)
            self._waiters.append(waiter)
        try:
            await waiter.future
        except asyncio.CancelledError:
            with self._lock:
                if not waiter.granted:
                    self._waiters.remove(waiter)
                    raise
            Slot(self).release()  # granted while being cancelled: pass the slot on
            raise
        return Slot(self)

    def _release(self, held_s: float) -> None:
        with self._lock:
            previous = self._mean_hold_s
            self._mean_hold_s = (
                held_s if previous is None else previous + self._EWMA_WEIGHT * (held_s - previous)
            )
            if not self._waiters or self._running > self.limits.max_running:
                self._running -= 1  # over a lowered max_running, the slot goes away
                return
            waiter = self._waiters.popleft()  # the slot passes straight on; running stays the same
            waiter.granted = True
        self._wake(waiter)

    def _wake(self, waiter: _Waiter) -> None:
        """Hands a granted slot to its waiter, from any thread."""
        try:
            waiter.loop.call_soon_threadsafe(_wake, waiter.future)
        except RuntimeError:  # that loop is closed (server shut down): nobody will use the slot
            self._release(0.0)

    def _retry_after_locked(self) -> int:
        """Seconds until a place in line is likely free: a typical request's duration per slot."""
        mean = self._mean_hold_s if self._mean_hold_s is not None else 1.0
        return max(1, min(MAX_RETRY_AFTER_S, math.ceil(mean / self.limits.max_running)))


def _wake(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)
