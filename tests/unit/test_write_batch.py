"""WriteBatch when the transaction holding a batch fails as a whole (its commit, say): every
caller gets its own BatchWriteFailed naming the cause, and the next batch is written."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any, cast

from edgefleet.controlplane.store.database import Database
from edgefleet.controlplane.store.write_batch import BatchWriteFailed, WriteBatch


class Savepoints:
    def begin_nested(self) -> contextlib.nullcontext[None]:
        return contextlib.nullcontext()


class CommitFailsOnce:
    """Stands in for Database: the first transaction fails to commit, later ones run."""

    def __init__(self) -> None:
        self.transactions = 0

    async def run(self, work: Callable[[Any], Any]) -> Any:
        self.transactions += 1
        if self.transactions == 1:
            raise OSError(28, "No space left on device")
        return work(Savepoints())


async def test_a_failed_commit_fails_each_caller_with_its_own_error_and_later_batches_run() -> None:
    db = CommitFailsOnce()
    batch = WriteBatch(cast(Database, db))
    outcomes = await asyncio.gather(*(batch.run(lambda _s, i=i: i) for i in range(4)), return_exceptions=True)
    assert all(isinstance(o, BatchWriteFailed) for o in outcomes)
    assert all(isinstance(o.__cause__, OSError) for o in outcomes if isinstance(o, BaseException))
    assert "No space left on device" in str(outcomes[0])
    assert len({id(o) for o in outcomes}) == 4
    assert await batch.run(lambda _s: "later") == "later"
