"""Wakes the desired-state streams of devices whose deployment changed.

Within one process a deploy wakes the device's stream at once; streams also re-read the
database every few seconds (see Settings), so a deploy made through another replica arrives too.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import defaultdict
from collections.abc import Iterator


class DesiredStateNotifier:
    """Per-device wake-up events, owned by the event loop of the gRPC server."""

    def __init__(self) -> None:
        self._events: defaultdict[str, set[asyncio.Event]] = defaultdict(set)

    def notify(self, device_ids: list[str]) -> None:
        for device_id in device_ids:
            for event in self._events.get(device_id, ()):
                event.set()

    @contextlib.contextmanager
    def subscribe(self, device_id: str) -> Iterator[asyncio.Event]:
        """An event set on every notify for the device.

        Clear it before reading the database, then wait on it: a deploy committed between
        the read and the wait still sets it, so no change is missed.
        """
        event = asyncio.Event()
        self._events[device_id].add(event)
        try:
            yield event
        finally:
            self._events[device_id].discard(event)
            if not self._events[device_id]:
                del self._events[device_id]


async def wait_event(event: asyncio.Event, within: float) -> None:
    """Waits for ``event`` at most ``within`` seconds."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(event.wait(), within)
