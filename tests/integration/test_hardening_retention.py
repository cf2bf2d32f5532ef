"""Retention on SQLite and PostgreSQL with the largest counters ingestion admits: the fold
saturates at BIGINT instead of failing every pass, and a step that fails leaves the pass's
other steps done."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import func, inspect, select, text
from sqlalchemy.engine import Engine
from sqlmodel import Session

from edgefleet.controlplane.store.engine import make_engine
from edgefleet.controlplane.store.models import Device, TelemetryDeadLetter, TelemetryRecord, TelemetryRollup
from edgefleet.controlplane.store.telemetry import IngestRecord, insert_telemetry
from edgefleet.controlplane.store.values import INT64_MAX
from edgefleet.controlplane.telemetry.retention import RetentionPolicy, apply_retention, hour_of

pytestmark = pytest.mark.integration

NOW = datetime(2026, 11, 22, 12, 30, tzinfo=UTC)
OLD = NOW - timedelta(days=8)
COUNTERS = ("records", "requests", "errors", "prompt_tokens", "completion_tokens", "decode_tokens")


@pytest.fixture(params=["sqlite", "postgres"])
def engine(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Engine]:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'cp.sqlite3'}"
    else:
        url = request.getfixturevalue("postgres_database")
    eng = make_engine(url)
    with Session(eng) as session:
        session.add(Device(id="dev-a"))
        session.commit()
    yield eng
    eng.dispose()


def absurd(seq: int, minutes: int) -> IngestRecord:
    """An inference summary whose every counter is the largest ingestion stores."""
    top = str(INT64_MAX)
    payload = {
        "requests": top,
        "errors": top,
        "promptTokens": top,
        "completionTokens": top,
        "decodeTokens": top,
        "decodeSeconds": 1.5e308,  # two of them sum to infinity
        "latencyMsP95": 1.0,
    }
    return IngestRecord("dev-a", "inference", seq, OLD + timedelta(minutes=minutes), payload)


def the_rollup(engine: Engine) -> TelemetryRollup:
    with Session(engine) as session:
        (row,) = session.exec(select(TelemetryRollup)).all()  # type: ignore[call-overload]
        rollup: TelemetryRollup = row[0]
        return rollup


def raw_count(engine: Engine) -> int:
    with engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(TelemetryRecord)).scalar_one())


def test_rollup_counters_are_bigint_on_postgresql(postgres_database: str) -> None:
    """INTEGER is 32-bit there; SQLite's INTEGER holds 64 bits already."""
    eng = make_engine(postgres_database)
    try:
        columns = {c["name"]: str(c["type"]) for c in inspect(eng).get_columns("telemetryrollup")}
    finally:
        eng.dispose()
    assert {name: columns[name] for name in COUNTERS} == dict.fromkeys(COUNTERS, "BIGINT")


@pytest.mark.parametrize("chunk_rows", [1, 100], ids=["merged-into-the-rollup", "summed-in-one-chunk"])
def test_counters_at_the_bigint_maximum_saturate_instead_of_failing_retention(
    engine: Engine, chunk_rows: int, caplog: pytest.LogCaptureFixture
) -> None:
    insert_telemetry(engine, records=[absurd(1, 0), absurd(2, 10), absurd(3, 20)])
    policy = RetentionPolicy(raw_for=timedelta(days=7), rollups_for=timedelta(days=30), chunk_rows=chunk_rows)

    result = apply_retention(engine, policy, now=NOW)

    assert result.failed == () and result.folded_rows == 3 and raw_count(engine) == 0
    assert result.saturated >= 6  # five counters and the decode seconds, at least once each
    rollup = the_rollup(engine)
    assert hour_of(rollup.hour) == hour_of(OLD) and rollup.records == 3
    for name in COUNTERS[1:]:
        assert getattr(rollup, name) == INT64_MAX, name
    assert 0 < rollup.decode_seconds < float("inf")
    assert "saturated" in caplog.text


def refuse_rollup_inserts(engine: Engine) -> None:
    """A trigger that makes the database refuse every new rollup: the fold cannot succeed."""
    with engine.begin() as conn:
        if engine.dialect.name == "sqlite":
            conn.execute(
                text(
                    "CREATE TRIGGER refuse BEFORE INSERT ON telemetryrollup "
                    "BEGIN SELECT RAISE(ABORT, 'refused'); END"
                )
            )
        else:
            conn.execute(
                text(
                    "CREATE FUNCTION refuse() RETURNS trigger AS $$ BEGIN "
                    "RAISE EXCEPTION 'refused' USING ERRCODE = '22023'; END $$ LANGUAGE plpgsql"
                )
            )
            conn.execute(
                text(
                    "CREATE TRIGGER refuse BEFORE INSERT ON telemetryrollup "
                    "FOR EACH ROW EXECUTE FUNCTION refuse()"
                )
            )


def allow_rollup_inserts(engine: Engine) -> None:
    with engine.begin() as conn:
        conn.execute(
            text("DROP TRIGGER refuse" + (" ON telemetryrollup" if engine.dialect.name != "sqlite" else ""))
        )


def test_a_fold_that_fails_leaves_expiry_and_pruning_done_and_is_retried(engine: Engine) -> None:
    ancient = hour_of(NOW - timedelta(days=400))
    with Session(engine) as session:
        session.add(TelemetryRollup(device_id="dev-a", kind="heartbeat", hour=ancient, records=1))
        session.add(TelemetryDeadLetter(received_at=OLD, topic="t", reason="malformed"))
        session.commit()
    insert_telemetry(engine, records=[absurd(1, 0)])
    refuse_rollup_inserts(engine)
    policy = RetentionPolicy(raw_for=timedelta(days=7), rollups_for=timedelta(days=365))

    result = apply_retention(engine, policy, now=NOW)

    assert result.failed == ("fold",) and result.folded_rows == 0
    assert result.deleted_rollups == 1
    with engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(TelemetryDeadLetter)).scalar_one() == 0
        assert conn.execute(select(func.count()).select_from(TelemetryRollup)).scalar_one() == 0
    assert raw_count(engine) == 1  # rolled back: nothing lost, nothing counted

    allow_rollup_inserts(engine)
    again = apply_retention(engine, policy, now=NOW)
    assert again.failed == () and again.folded_rows == 1 and raw_count(engine) == 0
    assert the_rollup(engine).requests == INT64_MAX
