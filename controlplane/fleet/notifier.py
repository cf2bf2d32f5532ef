"""Wakes the desired-state streams of devices whose deployment changed.

Within one process a change wakes the device's stream at once (``notify``). Changes made
through another replica arrive as PostgreSQL notices (``fleet.changes``), which call the same
``notify``; ``stale`` tells the periodic safety net which streams are behind the database.

A change this replica committed goes through ``changed``: it wakes the streams here and tells
the listeners (``on_change``), which announce it to devices over the broker
(``fleet.broker_notices``). Only the committing replica announces: the others hear of it by
LISTEN and only wake their own streams.

A change may wake thousands of streams at once; each then asks a ``BatchRead`` for its state,
which reads the state of every stream asking within a few milliseconds in one go, instead of
one transaction per stream (on SQLite each would queue for the write lock).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Generic, TypeVar

K = TypeVar("K")
V = TypeVar("V")

GATHER_WINDOW_S = 0.002  # a batch waits this long for more readers, again while more arrive,
GATHER_MAX_S = 0.02  # but no longer than this in all


@dataclass(eq=False)
class Watch:
    """One open stream: set ``event`` wakes it; ``sent`` is the generation it last sent."""

    event: asyncio.Event = field(default_factory=asyncio.Event)
    sent: int = 0


class DesiredStateNotifier:
    """Per-device wake-up events, owned by the event loop of the gRPC server."""

    def __init__(self) -> None:
        self._watches: defaultdict[str, set[Watch]] = defaultdict(set)
        self._listeners: list[Callable[[list[str]], None]] = []

    def on_change(self, listener: Callable[[list[str]], None]) -> None:
        """Calls ``listener`` (on the event loop, so it must not block) with the device ids of
        every change this replica commits (``changed``)."""
        self._listeners.append(listener)

    def changed(self, device_ids: list[str]) -> None:
        """This replica committed a change of these devices' desired state (or revoked them):
        wakes their streams here and tells the listeners."""
        self.notify(device_ids)
        for listener in self._listeners:
            listener(device_ids)

    def notify(self, device_ids: list[str]) -> None:
        for device_id in device_ids:
            for watch in self._watches.get(device_id, ()):
                watch.event.set()

    def notify_all(self) -> None:
        """Wakes every open stream (each re-reads its own state)."""
        for watches in self._watches.values():
            for watch in watches:
                watch.event.set()

    def connected(self) -> list[str]:
        """The devices with an open stream here."""
        return list(self._watches)

    def stale(self, generations: Mapping[str, int | None]) -> list[str]:
        """The connected devices whose streams are behind ``generations`` (device id → desired
        generation, None: revoked; a device missing from it was removed): those to wake."""
        behind = []
        for device_id, watches in self._watches.items():
            generation = generations.get(device_id)
            if generation is None or any(w.sent < generation for w in watches):
                behind.append(device_id)
        return behind

    @contextlib.contextmanager
    def subscribe(self, device_id: str) -> Iterator[Watch]:
        """A watch whose event is set on every notify for the device.

        Clear it before reading the database, then wait on it: a deploy committed between
        the read and the wait still sets it, so no change is missed.
        """
        watch = Watch()
        self._watches[device_id].add(watch)
        try:
            yield watch
        finally:
            self._watches[device_id].discard(watch)
            if not self._watches[device_id]:
                del self._watches[device_id]


async def wait_event(event: asyncio.Event, within: float | None) -> None:
    """Waits for ``event`` at most ``within`` seconds (None: until it is set)."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(event.wait(), within)


class BatchReadFailed(Exception):
    """The fetch that was to answer this read raised (its error is the ``__cause__``)."""


class BatchRead(Generic[K, V]):
    """Coalesces the reads of many tasks into one ``fetch`` of all their keys.

    ``read(key)`` queues the key and returns its value from the next fetch (None: the fetch
    had none for it). A fetch starts only after every read in it was queued, never before:
    so a task that cleared its wake-up event and then reads sees every change committed
    before it read, as with a read of its own. Reads queued while a fetch runs go to the
    next one. A failed fetch raises BatchReadFailed in each of its readers.
    """

    def __init__(
        self,
        fetch: Callable[[list[K]], Awaitable[Mapping[K, V]]],
        *,
        window: float = GATHER_WINDOW_S,
        longest: float = GATHER_MAX_S,
    ) -> None:
        self._fetch = fetch
        self._window = window
        self._longest = longest
        self._pending: dict[K, list[asyncio.Future[V | None]]] = {}
        self._gatherer: asyncio.Task[None] | None = None
        self.fetches = 0  # fetches made so far
        self.largest = 0  # the most keys one fetch read

    @property
    def idle(self) -> bool:
        """No read queued or being answered."""
        return not self._pending and (self._gatherer is None or self._gatherer.done())

    async def read(self, key: K) -> V | None:
        future: asyncio.Future[V | None] = asyncio.get_running_loop().create_future()
        self._pending.setdefault(key, []).append(future)
        if self._gatherer is None or self._gatherer.done():
            self._gatherer = asyncio.create_task(self._gather())
        return await future

    async def _gather(self) -> None:
        """Fetches batch after batch while reads are queued; ends when none is left."""
        try:
            while self._pending:
                started = time.monotonic()
                queued = -1
                while len(self._pending) != queued and time.monotonic() - started < self._longest:
                    queued = len(self._pending)
                    await asyncio.sleep(self._window)
                batch, self._pending = self._pending, {}
                waiting = {key: fs for key, fs in batch.items() if not all(f.done() for f in fs)}
                if waiting:
                    await self._answer(waiting)
        except asyncio.CancelledError:
            batch, self._pending = self._pending, {}
            for futures in batch.values():
                for future in futures:
                    future.cancel()
            raise

    async def _answer(self, waiting: dict[K, list[asyncio.Future[V | None]]]) -> None:
        self.fetches += 1
        self.largest = max(self.largest, len(waiting))
        try:
            found = await self._fetch(list(waiting))
        except asyncio.CancelledError:
            for futures in waiting.values():
                for future in futures:
                    future.cancel()
            raise
        except Exception as exc:
            for futures in waiting.values():
                for future in futures:
                    if not future.done():
                        # One instance each: raised in thousands of readers, a shared one
                        # would gather every reader's traceback.
                        failed = BatchReadFailed(f"the batched read failed: {exc!r}")
                        failed.__cause__ = exc
                        future.set_exception(failed)
            return
        for key, futures in waiting.items():
            value = found.get(key)
            for future in futures:
                if not future.done():
                    future.set_result(value)
