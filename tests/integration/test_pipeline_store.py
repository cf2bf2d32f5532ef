"""What one ingested batch does to the database (edgefleet.controlplane.store.telemetry.store_batch), on
SQLite and PostgreSQL: rows once, each device's last figures and presence in one UPDATE, and
nothing older replacing something newer, whichever replica writes last."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event, select
from sqlalchemy.engine import Engine
from sqlmodel import Session

from edgefleet.controlplane.store import devices
from edgefleet.controlplane.store.engine import make_engine
from edgefleet.controlplane.store.models import Device, TelemetryRecord
from edgefleet.controlplane.store.telemetry import IngestRecord, PresenceUpdate, StatusUpdate, store_batch

pytestmark = pytest.mark.integration

T0 = datetime(2025, 6, 1, 12, 0, tzinfo=UTC)


@pytest.fixture(params=["sqlite", "postgres"])
def engine(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Engine]:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'controlplane.sqlite3'}"
    else:
        url = str(request.getfixturevalue("postgres_database"))
    made = make_engine(url)
    with Session(made) as s, s.begin():
        for device_id in ("dev-a", "dev-b", "dev-revoked"):
            devices.create_device(s, device_id=device_id, hostname=device_id, labels={})
        revoked = s.get(Device, "dev-revoked")
        assert revoked is not None
        revoked.revoked_at = T0
    yield made
    made.dispose()


def device(engine: Engine, device_id: str) -> Device:
    with Session(engine) as s:
        row = s.get(Device, device_id)
        assert row is not None
        return row


def rows(engine: Engine) -> list[tuple[str, int]]:
    table = TelemetryRecord.__table__  # type: ignore[attr-defined]
    with engine.connect() as conn:
        found = conn.execute(select(table.c.device_id, table.c.seq).order_by(table.c.device_id, table.c.seq))
        return [(d, int(s)) for d, s in found]


def summary(device_id: str, seq: int, when: datetime, **payload: Any) -> IngestRecord:
    return IngestRecord(device_id, "inference", seq, when, {"deviceId": device_id, **payload})


def heartbeat(device_id: str, seq: int, when: datetime, requests_total: int) -> IngestRecord:
    return IngestRecord(device_id, "heartbeat", seq, when, {"requestsTotal": str(requests_total)})


def presence(device_id: str, online: bool, when: datetime, *, stamped: bool = True) -> PresenceUpdate:
    return PresenceUpdate(device_id=device_id, online=online, time=when, stamped=stamped)


def count_updates(engine: Engine) -> list[str]:
    statements: list[str] = []

    @event.listens_for(engine, "before_cursor_execute")
    def record(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if statement.lstrip().upper().startswith("UPDATE DEVICE"):
            statements.append(statement)

    return statements


def test_figures_come_from_summaries_and_heartbeats_in_one_update_per_device(engine: Engine) -> None:
    updates = count_updates(engine)
    records = [
        summary("dev-a", 1, T0, requests="4", errors="1", tokensPerSecond=80.0, latencyMsP95=120.0),
        heartbeat("dev-a", 2, T0 + timedelta(seconds=1), 17),
        summary(
            "dev-a",
            3,
            T0 + timedelta(seconds=2),
            requests="2",
            errors="0",
            tokensPerSecond=90.5,
            latencyMsP95=99.0,
        ),
        # embeddings only: no decode speed measured, so the last one stands
        summary(
            "dev-a",
            4,
            T0 + timedelta(seconds=3),
            requests="1",
            errors="0",
            tokensPerSecond=0.0,
            latencyMsP95=5.0,
        ),
        heartbeat("dev-b", 1, T0, 3),
    ]
    assert store_batch(engine, records=records) == 5
    a, b = device(engine, "dev-a"), device(engine, "dev-b")
    assert (a.last_tokens_per_second, a.last_latency_ms, a.requests_total) == (90.5, 5.0, 17)
    assert a.last_seen == T0 + timedelta(seconds=3)
    assert (b.requests_total, b.last_seen) == (3, T0)
    assert len(updates) == 2


def test_a_summary_whose_requests_all_failed_leaves_the_latency_alone(engine: Engine) -> None:
    store_batch(engine, records=[summary("dev-a", 1, T0, requests="2", errors="0", latencyMsP95=50.0)])
    store_batch(engine, records=[summary("dev-a", 2, T0, requests="3", errors="3", latencyMsP95=9000.0)])
    assert device(engine, "dev-a").last_latency_ms == 50.0


def test_repeated_rows_are_stored_once_and_unknown_devices_rows_are_kept(engine: Engine) -> None:
    batch = [heartbeat("dev-a", 1, T0, 1), heartbeat("dev-a", 1, T0, 1), heartbeat("dev-unknown", 1, T0, 1)]
    store_batch(engine, records=batch)
    store_batch(engine, records=batch)
    assert rows(engine) == [("dev-a", 1), ("dev-unknown", 1)]


def test_last_seen_never_moves_back(engine: Engine) -> None:
    store_batch(engine, records=[heartbeat("dev-a", 5, T0 + timedelta(minutes=5), 5)])
    store_batch(engine, records=[heartbeat("dev-a", 4, T0, 4)])  # another replica, later
    assert device(engine, "dev-a").last_seen == T0 + timedelta(minutes=5)


def test_newer_presence_wins_and_an_older_one_never_flips_it(engine: Engine) -> None:
    store_batch(engine, presence=[presence("dev-a", True, T0)])
    assert (device(engine, "dev-a").online, device(engine, "dev-a").presence_at) == (True, T0)

    # the Last Will, stamped with its arrival
    store_batch(engine, presence=[presence("dev-a", False, T0 + timedelta(seconds=30), stamped=False)])
    assert not device(engine, "dev-a").online

    # a retained "online" from before the will, redelivered to a replica that subscribes now
    store_batch(engine, presence=[presence("dev-a", True, T0 + timedelta(seconds=1))])
    row = device(engine, "dev-a")
    assert (row.online, row.presence_at) == (False, T0 + timedelta(seconds=30))

    store_batch(engine, presence=[presence("dev-a", True, T0 + timedelta(minutes=1))])
    assert device(engine, "dev-a").online


def test_within_one_batch_the_newest_presence_counts(engine: Engine) -> None:
    updates = count_updates(engine)
    store_batch(
        engine,
        records=[heartbeat("dev-a", 1, T0, 1)],
        presence=[
            presence("dev-a", True, T0 + timedelta(seconds=2)),
            presence("dev-a", False, T0 + timedelta(seconds=1)),
        ],
    )
    row = device(engine, "dev-a")
    assert (row.online, row.presence_at, row.last_seen) == (
        True,
        T0 + timedelta(seconds=2),
        T0 + timedelta(seconds=2),
    )
    assert len(updates) == 1


def test_a_last_will_is_no_sign_of_life_but_a_status_is(engine: Engine) -> None:
    store_batch(engine, presence=[presence("dev-a", False, T0, stamped=False)])
    assert device(engine, "dev-a").last_seen is None
    store_batch(
        engine, statuses=[StatusUpdate("dev-a", T0 + timedelta(seconds=5)), StatusUpdate("dev-b", None)]
    )
    assert device(engine, "dev-a").last_seen == T0 + timedelta(seconds=5)
    assert device(engine, "dev-b").last_seen is None


def test_a_revoked_devices_telemetry_presence_and_status_are_ignored(engine: Engine) -> None:
    assert (
        store_batch(
            engine,
            records=[heartbeat("dev-revoked", 1, T0, 9)],
            presence=[presence("dev-revoked", True, T0)],
            statuses=[StatusUpdate("dev-revoked", T0)],
        )
        == 0
    )
    row = device(engine, "dev-revoked")
    assert (row.online, row.presence_at, row.last_seen, row.requests_total) == (False, None, None, 0)
    assert rows(engine) == []
