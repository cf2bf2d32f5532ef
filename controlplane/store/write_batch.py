"""Coalesces many small write transactions into one, each in a savepoint of its own.

Every device reports its state after every change: a deploy to 10,000 devices brings 20,000
reports within seconds, and as one transaction each they queue for SQLite's single write
lock (and pay a commit apiece on PostgreSQL). ``WriteBatch.run(work)`` queues ``work`` and
runs it in the next batch: one transaction on one worker thread, every work in a SAVEPOINT,
so one that fails (a record the database refuses) is rolled back alone and raises in its own
caller while the rest commit. If the commit itself fails every caller of the batch gets a
``BatchWriteFailed`` whose ``__cause__`` is that error. A caller is answered only once its
batch committed: what it wrote is durable when its RPC returns, as before.

Batches gather while one is being written (at most ``MAX_BATCH`` works each), so an idle
control plane writes a lone report at once and a busy one writes bigger batches, not more.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from sqlmodel import Session

from edgefleet.controlplane.store.database import Database

T = TypeVar("T")

# Works per transaction: bounds how long one batch holds SQLite's write lock, which every
# other writer (a deploy, the rollout engine's tick, an enrollment) waits for. 500 reports per
# batch held it for seconds on a loaded 2-core host, past other writers' busy timeout.
MAX_BATCH = 64


class BatchWriteFailed(Exception):
    """The transaction holding this work could not commit (its error is the ``__cause__``)."""


@dataclass(eq=False)
class _Queued(Generic[T]):
    work: Callable[[Session], T]
    future: asyncio.Future[T]


class WriteBatch:
    """Runs queued write works in shared transactions; owned by one event loop."""

    def __init__(self, db: Database, *, largest: int = MAX_BATCH) -> None:
        self._db = db
        self._largest = largest
        self._queue: list[_Queued[Any]] = []
        self._writer: asyncio.Task[None] | None = None
        self.batches = 0  # transactions written so far
        self.biggest = 0  # the most works one transaction held

    async def run(self, work: Callable[[Session], T]) -> T:
        """``work``'s result once the batch holding it committed; its exception if it raised
        (its savepoint rolled back), or the commit's if the batch could not commit."""
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._queue.append(_Queued(work, future))
        if self._writer is None or self._writer.done():
            self._writer = asyncio.create_task(self._write_all())
        return await future

    async def _write_all(self) -> None:
        while self._queue:
            batch, self._queue = self._queue[: self._largest], self._queue[self._largest :]
            batch = [queued for queued in batch if not queued.future.cancelled()]
            if not batch:
                continue
            self.batches += 1
            self.biggest = max(self.biggest, len(batch))
            try:
                outcomes = await self._db.run(functools.partial(_apply, batch=batch))
            except asyncio.CancelledError:
                for queued in [*batch, *self._queue]:
                    queued.future.cancel()
                self._queue = []
                raise
            except Exception as exc:
                for queued in batch:
                    if not queued.future.done():
                        # One instance each: raised in many callers, a shared one would
                        # gather every caller's traceback.
                        failed = BatchWriteFailed(f"the batched write failed: {exc!r}")
                        failed.__cause__ = exc
                        queued.future.set_exception(failed)
                continue
            for queued, (ok, value) in zip(batch, outcomes, strict=True):
                if queued.future.done():
                    continue
                if ok:
                    queued.future.set_result(value)
                else:
                    queued.future.set_exception(value)


def _apply(session: Session, *, batch: list[_Queued[Any]]) -> list[tuple[bool, Any]]:
    """Runs each work in a savepoint; (True, result) or (False, its exception) per work."""
    outcomes: list[tuple[bool, Any]] = []
    for queued in batch:
        try:
            with session.begin_nested():
                outcomes.append((True, queued.work(session)))
        except Exception as exc:  # handed to the work's own caller
            outcomes.append((False, exc))
    return outcomes
