"""A token bucket for artifact bytes: ``max_download_rate`` bytes per second over every source
(mirrors and the control plane alike), so an update cannot starve what the device serves or
the site's uplink.

The bucket may go into debt: a piece larger than what is left is taken whole and the taker
sleeps until the debt is paid back, so pieces of any size pass and the average rate holds.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field

MIN_BURST = 64 * 1024


@dataclass(slots=True)
class TokenBucket:
    """``rate`` bytes per second (0: unlimited), bursting up to one second's worth (at least
    MIN_BURST). One bucket is shared by every download of a store, so the limit is the device's."""

    rate: int
    clock: Callable[[], float] = time.monotonic
    _tokens: float = field(init=False)
    _stamp: float = field(init=False)
    _lock: asyncio.Lock = field(init=False, default_factory=asyncio.Lock)

    def __post_init__(self) -> None:
        self._tokens = float(self.burst)
        self._stamp = self.clock()

    @property
    def burst(self) -> int:
        return max(self.rate, MIN_BURST)

    def _refill(self) -> None:
        now = self.clock()
        self._tokens = min(float(self.burst), self._tokens + (now - self._stamp) * self.rate)
        self._stamp = now

    async def take(self, amount: int) -> None:
        """Waits until ``amount`` bytes may pass; at once when the rate is unlimited."""
        if self.rate <= 0 or amount <= 0:
            return
        async with self._lock:  # takers queue up: each waits out the debt of those before it
            self._refill()
            self._tokens -= amount
            if self._tokens < 0:
                await asyncio.sleep(-self._tokens / self.rate)
                self._refill()
