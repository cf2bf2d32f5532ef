"""Telemetry retention on SQLite and PostgreSQL: old raw rows become hourly rollups whose
figures equal what the rows said, exactly once, and expired rollups go."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import func, select
from sqlalchemy.engine import Engine
from sqlmodel import Session

from edgefleet.controlplane.store.engine import make_engine
from edgefleet.controlplane.store.models import Device, TelemetryRecord, TelemetryRollup
from edgefleet.controlplane.store.telemetry import IngestRecord, insert_telemetry
from edgefleet.controlplane.telemetry.retention import RetentionPolicy, apply_retention, hour_of

pytestmark = pytest.mark.integration

NOW = datetime(2026, 11, 22, 12, 30, tzinfo=UTC)
POLICY = RetentionPolicy(raw_for=timedelta(days=7), rollups_for=timedelta(days=30), chunk_rows=7)


@pytest.fixture(params=["sqlite", "postgres"])
def engine(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Engine]:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'cp.sqlite3'}"
    else:
        url = request.getfixturevalue("postgres_database")
    eng = make_engine(url)
    with Session(eng) as session:
        session.add(Device(id="dev-a"))
        session.add(Device(id="dev-b"))
        session.commit()
    yield eng
    eng.dispose()


def inference(
    device: str, seq: int, time: datetime, *, requests: int, tokens: int, rate: float, p95: float
) -> IngestRecord:
    payload = {
        "requests": str(requests),  # protobuf's JSON mapping: 64-bit integers as strings
        "errors": "1",
        "promptTokens": "10",
        "completionTokens": str(tokens),
        "tokensPerSecond": rate,
        "decodeTokens": str(tokens),
        "decodeSeconds": tokens / rate,
        "latencyMsP95": p95,
    }
    return IngestRecord(device_id=device, kind="inference", seq=seq, time=time, payload=payload)


def heartbeat(device: str, seq: int, time: datetime, *, rss: int, cpu: float) -> IngestRecord:
    return IngestRecord(
        device_id=device,
        kind="heartbeat",
        seq=seq,
        time=time,
        payload={"rssBytes": str(rss), "cpuPercent": cpu},
    )


def rollups(engine: Engine) -> dict[tuple[str, str, datetime], TelemetryRollup]:
    with Session(engine) as session:
        rows = session.exec(select(TelemetryRollup)).all()  # type: ignore[call-overload]
        return {(r[0].device_id, r[0].kind, hour_of(r[0].hour)): r[0] for r in rows}


def raw_count(engine: Engine) -> int:
    with engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(TelemetryRecord)).scalar_one())


def test_old_rows_fold_into_hourly_rollups_and_recent_rows_stay(engine: Engine) -> None:
    old = NOW - timedelta(days=8)
    hour = hour_of(old)
    records = [
        inference("dev-a", 1, old, requests=4, tokens=100, rate=50.0, p95=300.0),  # 2 s of decode
        inference(
            "dev-a", 2, old + timedelta(minutes=10), requests=6, tokens=300, rate=100.0, p95=500.0
        ),  # 3 s
        inference("dev-a", 3, old + timedelta(hours=1), requests=1, tokens=10, rate=10.0, p95=50.0),
        *(
            heartbeat("dev-a", 10 + i, old + timedelta(minutes=i), rss=1000 + i, cpu=10.0 * i)
            for i in range(5)
        ),
        inference("dev-b", 1, old, requests=2, tokens=20, rate=20.0, p95=80.0),
        inference("dev-a", 99, NOW - timedelta(days=1), requests=9, tokens=9, rate=9.0, p95=9.0),  # recent
    ]
    insert_telemetry(engine, records=records)

    result = apply_retention(engine, POLICY, now=NOW)
    assert result.folded_rows == 9 and raw_count(engine) == 1  # chunks of 7: the second ends mid-hour
    got = rollups(engine)
    first = got[("dev-a", "inference", hour)]
    assert (first.records, first.requests, first.errors, first.completion_tokens) == (2, 10, 2, 400)
    assert first.decode_tokens / first.decode_seconds == pytest.approx(80.0)  # 400 tokens over 5 s
    assert first.latency_ms_p95_max == 500.0
    assert got[("dev-a", "inference", hour + timedelta(hours=1))].requests == 1
    beats = got[("dev-a", "heartbeat", hour)]
    assert (beats.records, beats.rss_bytes_max, beats.cpu_percent_sum) == (5, 1004, 100.0)
    assert got[("dev-b", "inference", hour)].requests == 2

    assert apply_retention(engine, POLICY, now=NOW).folded_rows == 0  # nothing counted twice
    assert rollups(engine)[("dev-a", "inference", hour)].requests == 10


def test_expired_rollups_are_deleted(engine: Engine) -> None:
    insert_telemetry(engine, records=[heartbeat("dev-a", 1, NOW - timedelta(days=40), rss=1, cpu=1.0)])
    apply_retention(engine, POLICY, now=NOW - timedelta(days=20))  # folded while the rollup was young
    assert len(rollups(engine)) == 1
    assert apply_retention(engine, POLICY, now=NOW).deleted_rollups == 1
    assert rollups(engine) == {}


def test_concurrent_passes_never_count_a_row_twice(engine: Engine) -> None:
    old = NOW - timedelta(days=9)
    insert_telemetry(
        engine,
        records=[inference("dev-a", i, old, requests=1, tokens=1, rate=1.0, p95=1.0) for i in range(1, 200)],
    )
    threads = [
        threading.Thread(target=apply_retention, args=(engine, POLICY), kwargs={"now": NOW}) for _ in range(3)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    apply_retention(engine, POLICY, now=NOW)  # whatever a conflict left behind
    assert raw_count(engine) == 0
    assert rollups(engine)[("dev-a", "inference", hour_of(old))].requests == 199
