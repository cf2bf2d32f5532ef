"""Two replicas signing the same repository at once on one PostgreSQL: each change to a
repository (the image one, or one device's director metadata) reads, signs and stores its next
versions under that repository's advisory lock, so the second waits for the first and then
signs the versions after it, rather than allocating the same ones and failing on commit; and
periodic re-signing, one small transaction per repository, lets two replicas re-sign at once
with both finishing and the metadata re-signed once."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from typing import TypeVar

import pytest
from sqlalchemy import text
from sqlalchemy.engine import Engine
from sqlmodel import Session
from tuf.api.metadata import Metadata, Targets

from edgefleet.controlplane.store.database import Database
from edgefleet.controlplane.store.engine import make_engine
from edgefleet.controlplane.trust.keys import KeyDir
from edgefleet.controlplane.trust.repositories import Expiry, Repositories
from edgefleet.protos.fleet.uptane import DIRECTOR

pytestmark = pytest.mark.integration

T = TypeVar("T")
DEVICE = "dev-0123abcd"


@pytest.fixture
def engines(postgres_database: str) -> Iterator[tuple[Engine, Engine]]:
    """Two replicas' engines on one database."""
    a, b = make_engine(postgres_database), make_engine(postgres_database)
    yield a, b
    a.dispose()
    b.dispose()


def publish_empty_image(session: Session, repositories: Repositories, keys: KeyDir) -> None:
    repositories.bootstrap(session)
    targets = Metadata(Targets(version=1, expires=datetime.now(UTC) + timedelta(days=30)))
    for signer in keys.release_signers():
        targets.sign(signer, append=True)
    repositories.publish_image_targets(session, targets.to_bytes(), release=None)


def versions(engine: Engine, role: str) -> list[int]:
    with engine.connect() as conn:
        rows = conn.execute(
            text(
                "SELECT version FROM tufmetadata WHERE repository = :repo AND device_id = :device "
                "AND role = :role ORDER BY version"
            ),
            {"repo": DIRECTOR, "device": DEVICE, "role": role},
        ).scalars()
        return list(rows)


def wait_until_blocked(engine: Engine) -> None:
    """Until a session of this database waits for a lock (the second replica's transaction)."""
    deadline = time.monotonic() + 60
    with engine.connect() as conn:
        while time.monotonic() < deadline:
            waiting = conn.execute(
                text(
                    "SELECT count(*) FROM pg_locks JOIN pg_stat_activity USING (pid) "
                    "WHERE NOT granted AND datname = current_database()"
                )
            ).scalar()
            if waiting:
                return
            time.sleep(0.05)
    raise AssertionError("the second transaction never waited for the first")


def while_first_holds(
    engine_a: Engine, first: Callable[[Session], object], second: Callable[[], T]
) -> tuple[object, Future[T]]:
    """Runs ``first`` in an open transaction on ``engine_a``, starts ``second`` in a thread,
    waits until it blocks on a lock the first holds, then commits the first."""
    with ThreadPoolExecutor(1) as pool, Session(engine_a, expire_on_commit=False) as session:
        with session.begin():
            result = first(session)
            later = pool.submit(second)
            wait_until_blocked(engine_a)
        later.result(timeout=60)
    return result, later


def test_two_replicas_assigning_one_device_at_once_get_distinct_versions(
    engines: tuple[Engine, Engine], keys: KeyDir
) -> None:
    engine_a, engine_b = engines
    replica_a, replica_b = Repositories(keys), Repositories(keys)
    Database(engine_a).run_sync(lambda s: publish_empty_image(s, replica_a, keys))

    _, second = while_first_holds(
        engine_a,
        lambda s: replica_a.assign(s, device_id=DEVICE, generation=1, releases=[]),
        lambda: Database(engine_b).run_sync(
            lambda s: replica_b.assign(s, device_id=DEVICE, generation=2, releases=[])
        ),
    )
    assert second.exception() is None
    for role in ("targets", "snapshot", "timestamp"):
        assert versions(engine_a, role) == [1, 2]


def test_two_replicas_re_signing_at_once_both_finish_and_sign_once(
    engines: tuple[Engine, Engine], keys: KeyDir
) -> None:
    engine_a, engine_b = engines
    # Signed with a short-lived timestamp: past half its lifetime for replicas that keep a day.
    short = Repositories(keys, expiry=Expiry(director_timestamp=timedelta(hours=1)))
    Database(engine_a).run_sync(lambda s: publish_empty_image(s, short, keys))
    Database(engine_a).run_sync(lambda s: short.assign(s, device_id=DEVICE, generation=1, releases=[]))
    replica_a, replica_b = Repositories(keys), Repositories(keys)
    assert Database(engine_a).run_sync(replica_a.expiring) == [DEVICE]
    assert Database(engine_b).run_sync(replica_b.expiring) == [DEVICE]

    first, second = while_first_holds(
        engine_a,
        lambda s: replica_a.refresh_one(s, DEVICE),
        lambda: Database(engine_b).run_sync(lambda s: replica_b.refresh_one(s, DEVICE)),
    )
    assert first is True
    assert second.result() is False  # it found the metadata re-signed once it held the lock
    assert versions(engine_a, "timestamp") == [1, 2]
    assert Database(engine_b).run_sync(replica_b.expiring) == []
