"""How much memory the device's models may hold at once, and who makes way when one must load.

A device holding several models rarely needs all of them in memory (Ollama's and Foundry
Local's observation): a model loads when a request names it and, when the budget is full,
the least recently used idle model is unloaded first. Estimates, not measurements: each model
counts what variant selection estimated for it (weights plus the KV cache of the configured
context), so the budget is checked before a load, when it can still be refused cleanly,
instead of after the kernel has started killing processes.

Loads go one at a time (the budget's lock is held across each): two large loads racing would
both see room that only one of them can have.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Protocol, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")


class ModelMemoryExhausted(Exception):
    """A model cannot load without going over the memory budget, and nothing idle can make way."""

    def __init__(self, message: str, *, retry_after_s: int = 5) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class Evictable(Protocol):
    """A model the budget can unload to make room (it loads again on its next request)."""

    @property
    def name(self) -> str: ...

    @property
    def footprint_bytes(self) -> int: ...

    @property
    def loaded(self) -> bool: ...

    @property
    def last_used(self) -> float: ...

    def try_evict(self) -> bool:
        """Unload now if idle; False when in use (or busy loading), and nothing changes."""
        ...


class MemoryBudget:
    """The models' memory limit (``None``: unlimited) and the members it may evict."""

    def __init__(self, limit_bytes: int | None) -> None:
        if limit_bytes is not None and limit_bytes <= 0:
            raise ValueError("the memory budget must be positive (or None for unlimited)")
        self.limit_bytes = limit_bytes
        self._load_lock = threading.Lock()
        self._members_lock = threading.Lock()
        self._members: list[Evictable] = []

    def join(self, member: Evictable) -> None:
        with self._members_lock:
            if not any(m is member for m in self._members):
                self._members.append(member)

    def leave(self, member: Evictable) -> None:
        with self._members_lock:
            self._members = [m for m in self._members if m is not member]

    def resident_bytes(self) -> int:
        """What the loaded members are estimated to hold."""
        return sum(m.footprint_bytes for m in self._snapshot() if m.loaded)

    def load(
        self, *, name: str, footprint_bytes: int, factory: Callable[[], T], requester: object = None
    ) -> T:
        """Make room for ``footprint_bytes`` (evicting least recently used idle members other
        than ``requester``), then run ``factory``; raises ModelMemoryExhausted when no room can
        be made. The lock is held across the load, so loads never race for the same room."""
        with self._load_lock:
            self._make_room(name=name, need=footprint_bytes, requester=requester)
            return factory()

    def _snapshot(self) -> list[Evictable]:
        with self._members_lock:
            return list(self._members)

    def _make_room(self, *, name: str, need: int, requester: object) -> None:
        limit = self.limit_bytes
        if limit is None:
            return
        if need > limit:
            raise ModelMemoryExhausted(
                f"`{name}` needs an estimated {_mib(need)}, more than the models' memory budget of "
                f"{_mib(limit)}",
                retry_after_s=60,
            )
        others = [m for m in self._snapshot() if m is not requester and m.loaded]
        used = sum(m.footprint_bytes for m in others)
        for victim in sorted(others, key=lambda m: m.last_used):
            if used + need <= limit:
                break
            if victim.try_evict():
                used -= victim.footprint_bytes
                log.info("unloaded %s to make room for %s (memory budget %s)", victim.name, name, _mib(limit))
        if used + need > limit:
            busy = ", ".join(sorted(m.name for m in others if m.loaded)) or "nothing"
            raise ModelMemoryExhausted(
                f"`{name}` needs an estimated {_mib(need)} but {_mib(used)} of the {_mib(limit)} memory "
                f"budget is held by models in use ({busy}); retry when they finish"
            )


def _mib(n: int) -> str:
    return f"{n / 2**20:.0f} MiB"
