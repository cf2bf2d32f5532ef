"""BatchRead: the reads of many woken streams coalesce into one fetch, a fetch never starts
before a read it answers was queued, and a failed fetch fails each of its readers."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping

import pytest

from edgefleet.controlplane.fleet.notifier import BatchRead, BatchReadFailed


class Store:
    """A key-value store whose fetches are recorded and can be held open."""

    def __init__(self) -> None:
        self.values: dict[str, int] = {}
        self.fetched: list[list[str]] = []
        self.hold: asyncio.Event | None = None
        self.fetching = asyncio.Event()
        self.fail: Exception | None = None

    async def fetch(self, keys: list[str]) -> Mapping[str, int]:
        self.fetched.append(keys)
        snapshot = {k: self.values[k] for k in keys if k in self.values}  # read when the fetch starts
        self.fetching.set()
        if self.hold is not None:
            await self.hold.wait()
        if self.fail is not None:
            raise self.fail
        return snapshot


async def test_reads_queued_together_are_one_fetch() -> None:
    store = Store()
    store.values = {f"d{i}": i for i in range(50)}
    batch = BatchRead(store.fetch)
    got = await asyncio.gather(*(batch.read(f"d{i}") for i in range(50)), batch.read("d7"))
    assert got == [*range(50), 7]
    assert len(store.fetched) == 1 and sorted(store.fetched[0]) == sorted(f"d{i}" for i in range(50))
    assert (batch.fetches, batch.largest) == (1, 50)


async def test_a_key_the_fetch_lacks_reads_none() -> None:
    store = Store()
    assert await BatchRead(store.fetch).read("gone") is None


async def test_a_read_queued_during_a_fetch_waits_for_the_next_one() -> None:
    """The guarantee a stream relies on: a change committed before its read was queued is seen."""
    store = Store()
    store.values = {"a": 1, "b": 1}
    store.hold = asyncio.Event()
    batch = BatchRead(store.fetch)
    first = asyncio.create_task(batch.read("a"))
    await store.fetching.wait()
    store.values["b"] = 2  # committed after the running fetch read its snapshot
    second = asyncio.create_task(batch.read("b"))
    await asyncio.sleep(0)
    store.hold.set()
    assert (await first, await second) == (1, 2)
    assert store.fetched == [["a"], ["b"]]


async def test_a_failed_fetch_fails_every_reader_and_the_next_read_fetches_again() -> None:
    store = Store()
    store.values = {"a": 1, "b": 2}
    store.fail = RuntimeError("database gone")
    batch = BatchRead(store.fetch)
    results = await asyncio.gather(batch.read("a"), batch.read("b"), return_exceptions=True)
    assert [type(r) for r in results] == [BatchReadFailed, BatchReadFailed]
    assert all(isinstance(r.__cause__, RuntimeError) for r in results)
    assert results[0] is not results[1]
    store.fail = None
    assert await batch.read("b") == 2


async def test_a_cancelled_reader_leaves_the_others_their_answer() -> None:
    store = Store()
    store.values = {"a": 1, "b": 2}
    store.hold = asyncio.Event()
    batch = BatchRead(store.fetch)
    gone = asyncio.create_task(batch.read("a"))
    stays = asyncio.create_task(batch.read("b"))
    await store.fetching.wait()
    gone.cancel()
    store.hold.set()
    assert await stays == 2
    with pytest.raises(asyncio.CancelledError):
        await gone


async def test_readers_all_cancelled_before_the_fetch_cost_no_fetch() -> None:
    store = Store()
    batch = BatchRead(store.fetch, window=0.01)
    reader = asyncio.create_task(batch.read("a"))
    await asyncio.sleep(0)
    reader.cancel()
    with pytest.raises(asyncio.CancelledError):
        await reader
    assert await batch.read("a") is None  # the gatherer survived and serves the next read
    assert store.fetched == [["a"]]
