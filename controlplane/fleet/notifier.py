"""Wakes the desired-state streams of devices whose deployment changed.

Within one process a change wakes the device's stream at once (``notify``). Changes made
through another replica arrive as PostgreSQL notices (``fleet.changes``), which call the same
``notify``; ``stale`` tells the periodic safety net which streams are behind the database.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import defaultdict
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field


@dataclass(eq=False)
class Watch:
    """One open stream: set ``event`` wakes it; ``sent`` is the generation it last sent."""

    event: asyncio.Event = field(default_factory=asyncio.Event)
    sent: int = 0


class DesiredStateNotifier:
    """Per-device wake-up events, owned by the event loop of the gRPC server."""

    def __init__(self) -> None:
        self._watches: defaultdict[str, set[Watch]] = defaultdict(set)

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
