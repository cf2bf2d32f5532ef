"""A one-slot mailbox that keeps only the newest value: for desired states and status reports,
where an older value is worthless once a newer one exists."""

from __future__ import annotations

import asyncio
from typing import Generic, TypeVar

T = TypeVar("T")


class Latest(Generic[T]):
    def __init__(self) -> None:
        self._value: T | None = None
        self._ready = asyncio.Event()

    def put(self, value: T) -> None:
        self._value = value
        self._ready.set()

    def put_if_empty(self, value: T) -> None:
        """Puts ``value`` back for a retry unless something newer already arrived."""
        if not self._ready.is_set():
            self.put(value)

    async def get(self) -> T:
        await self._ready.wait()
        self._ready.clear()
        value = self._value
        assert value is not None
        self._value = None
        return value
