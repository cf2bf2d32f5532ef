"""Batched status writes on a real SQLite database: concurrent works share transactions, a
work the database refuses fails alone while the rest of its batch commits, a batch that
cannot commit fails each of its callers with a typed error, and a lone work is written at
once. (A batch whose commit fails: tests/unit/test_write_batch.py.)"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlmodel import Session, create_engine, select

from edgefleet.controlplane.store.database import Database
from edgefleet.controlplane.store.engine import make_engine
from edgefleet.controlplane.store.models import Device
from edgefleet.controlplane.store.write_batch import BatchWriteFailed, WriteBatch

pytestmark = pytest.mark.integration


@pytest.fixture
def db(tmp_path: Path) -> Iterator[Database]:
    engine = make_engine(f"sqlite:///{tmp_path / 'store.db'}")
    try:
        yield Database(engine)
    finally:
        engine.dispose()


def add_device(device_id: str) -> Callable[[Session], str]:
    def work(session: Session) -> str:
        session.add(Device(id=device_id))
        session.flush()
        return device_id

    return work


def stored(db: Database) -> set[str]:
    return set(db.run_sync(lambda s: list(s.exec(select(Device.id)).all())))


async def test_concurrent_writes_share_transactions_and_all_commit(db: Database) -> None:
    batch = WriteBatch(db, largest=50)
    ids = [f"dev-{i}" for i in range(200)]
    results = await asyncio.gather(*(batch.run(add_device(i)) for i in ids))
    assert results == ids
    assert stored(db) == set(ids)
    assert batch.batches < len(ids) // 10  # shared, not one transaction each
    assert batch.biggest <= 50


async def test_a_refused_work_fails_alone_and_its_batch_commits(db: Database) -> None:
    await WriteBatch(db).run(add_device("taken"))
    batch = WriteBatch(db)
    outcomes = await asyncio.gather(
        batch.run(add_device("before")),
        batch.run(add_device("taken")),
        batch.run(add_device("after")),
        return_exceptions=True,
    )
    assert outcomes[0] == "before" and outcomes[2] == "after"
    assert isinstance(outcomes[1], IntegrityError)
    assert stored(db) == {"taken", "before", "after"}
    assert batch.batches == 1


async def test_every_caller_fails_when_the_database_cannot_be_opened(tmp_path: Path) -> None:
    # SQLite cannot open a file in a directory that does not exist: no work can begin.
    unreachable = Database(create_engine(f"sqlite:///{tmp_path / 'missing' / 'store.db'}"))
    batch = WriteBatch(unreachable)
    outcomes = await asyncio.gather(
        *(batch.run(add_device(f"late-{i}")) for i in range(3)),
        return_exceptions=True,
    )
    for outcome in outcomes:
        assert isinstance(outcome, OperationalError | BatchWriteFailed), outcome
        assert "unable to open database file" in str(outcome)


async def test_a_lone_work_is_written_at_once(db: Database) -> None:
    batch = WriteBatch(db)
    assert await asyncio.wait_for(batch.run(add_device("solo")), 10) == "solo"
    assert batch.batches == 1 and batch.biggest == 1
