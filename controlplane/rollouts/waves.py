"""Wave sizing and membership: how many devices each wave of a rollout holds, and which wave a
device joins. Pure functions; the engine keeps the result in RolloutDevice rows.

Waves are cumulative, as operators think of them ("1%, then 10%, then half, then everyone"):
either all percentages of the rollout's devices or all device counts, strictly increasing. A
percentage rounds up and a wave holds at least one device, so a canary of 1% of 20 devices is
one device, not none; the last wave always takes every remaining device, whatever it says.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any


class InvalidWaves(ValueError):
    """Wave sizes an operator gave that cannot describe a rollout."""


@dataclass(frozen=True, slots=True)
class WaveSize:
    """One wave's cumulative size: ``percent`` of the rollout's devices, or ``count`` devices."""

    percent: float | None = None
    count: int | None = None

    def as_json(self) -> dict[str, Any]:
        return {"percent": self.percent} if self.percent is not None else {"count": self.count}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> WaveSize:
        if "percent" in data:
            return cls(percent=float(data["percent"]))
        return cls(count=int(data["count"]))

    def __str__(self) -> str:
        return f"{self.percent:g}%" if self.percent is not None else str(self.count)


ALL = WaveSize(percent=100.0)


def check_waves(waves: Sequence[WaveSize]) -> None:
    """Raises InvalidWaves unless the sizes are all percentages in (0, 100] or all counts of at
    least 1, strictly increasing. No waves at all is one wave of every device."""
    if any((w.percent is None) == (w.count is None) for w in waves):
        raise InvalidWaves("each wave is either a percentage or a device count")
    kinds = {w.percent is None for w in waves}
    if len(kinds) > 1:
        raise InvalidWaves("waves must be all percentages (1%,10%,100%) or all device counts (1,10,100)")
    for wave in waves:
        if wave.percent is not None and not 0 < wave.percent <= 100:
            raise InvalidWaves(f"wave {wave}: a percentage must be above 0 and at most 100")
        if wave.count is not None and wave.count < 1:
            raise InvalidWaves(f"wave {wave}: a device count must be at least 1")
    sizes = [w.percent if w.percent is not None else float(w.count or 0) for w in waves]
    for before, after in itertools.pairwise(sizes):
        if after <= before:
            raise InvalidWaves(f"waves are cumulative and must grow: {after:g} after {before:g}")


def effective(waves: Sequence[WaveSize]) -> list[WaveSize]:
    """The waves a rollout runs: as given, or one wave of every device when none were given."""
    return list(waves) or [ALL]


def cumulative_sizes(waves: Sequence[WaveSize], total: int) -> list[int]:
    """How many of ``total`` devices the waves hold, cumulatively (the last is always ``total``).

    A percentage rounds up (rounded to 9 decimals first, so 7% of 100 is 7, not 8 by float
    error), at least 1; a count is capped at ``total``; a size never shrinks below the one before.
    """
    waves = effective(waves)
    sizes: list[int] = []
    previous = 0
    for index, wave in enumerate(waves):
        if index == len(waves) - 1:
            size = total
        elif wave.percent is not None:
            size = max(1, math.ceil(round(total * wave.percent / 100, 9)))
        else:
            size = wave.count or 0
        previous = min(max(size, previous), total)
        sizes.append(previous)
    return sizes


def place(counts: Sequence[int], sizes: Sequence[int], first_open: int, new: int) -> list[int]:
    """The wave of each of ``new`` devices joining, in order: the first wave from ``first_open``
    on that is below its cumulative size, else the last wave.

    ``counts`` is how many devices each wave holds now and ``sizes`` the cumulative sizes for the
    new total (``cumulative_sizes``). Waves before ``first_open`` (done, or soaking) never get a
    device: a device that enrolls during a rollout joins the current wave while it has room, a
    later one otherwise, and the last wave when every wave is full.
    """
    held = list(counts)
    last = len(held) - 1
    start = min(max(first_open, 0), last)
    placed: list[int] = []
    for _ in range(new):
        chosen = last
        for wave in range(start, last + 1):
            if sum(held[: wave + 1]) < sizes[wave]:
                chosen = wave
                break
        held[chosen] += 1
        placed.append(chosen)
    return placed
