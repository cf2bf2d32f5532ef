"""The resource figures a heartbeat carries: this process's CPU, free memory, free disk.

Measuring never raises: a figure that cannot be read (psutil missing, /proc hidden, the state
dir's disk gone) is reported as 0, because a heartbeat with a gap beats no heartbeat.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import psutil

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ResourceUsage:
    cpu_percent: float  # this process since the previous sample; 100 = one core
    memory_available_bytes: int
    disk_free_bytes: int


class ResourceSampler:
    """Samples resource usage for successive heartbeats.

    One psutil.Process is kept for the sampler's life: ``cpu_percent`` compares with the
    previous call on the same object, so each beat reports the CPU used since the last beat
    (the first one: since the sampler was made).
    """

    def __init__(self, disk_path: Path) -> None:
        """``disk_path`` is where free space matters: the state dir (models, outbox)."""
        self._disk_path = disk_path
        self._process = _own_process()

    def sample(self) -> ResourceUsage:
        return ResourceUsage(
            cpu_percent=self._cpu_percent(),
            memory_available_bytes=available_ram_bytes() or 0,
            disk_free_bytes=_disk_free(self._disk_path),
        )

    def _cpu_percent(self) -> float:
        if self._process is None:
            return 0.0
        try:
            return float(self._process.cpu_percent(interval=None))
        except Exception:  # the process table became unreadable: report unknown
            return 0.0


def _own_process() -> psutil.Process | None:
    """This process as psutil sees it, primed so the first sample covers the time since now."""
    try:
        import psutil

        process = psutil.Process()
        process.cpu_percent(interval=None)
        return process
    except Exception:  # psutil missing or /proc unreadable
        logger.warning("psutil cannot read this process; heartbeats report cpu_percent 0")
        return None


def available_ram_bytes() -> int | None:
    """RAM the system can still hand out; None when psutil cannot tell."""
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except Exception:
        return None


def _disk_free(path: Path) -> int:
    try:
        return int(shutil.disk_usage(path).free)
    except OSError:
        return 0
