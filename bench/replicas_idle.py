"""What an idle connected device costs the database: commits per second per device.

    python -m bench.replicas_idle [--devices 200] [--replicas 2] [--interval 60]

Replicas on one throwaway PostgreSQL database hold ``devices`` simulated device streams that
receive nothing (bench.replicas_notify sets them up). ``pg_stat_database.xact_commit`` of that
database is read before and after ``interval`` seconds: before any device enrolled, with every
stream open and idle, and with the same devices enrolled and disconnected (the two without
devices are the baseline: the replicas' own upkeep, rollout leadership, health; the lower
counts). Per-device cost = (commits/s with devices - baseline commits/s) / devices; target ≤
0.001 (10,000 idle devices: ≤ 10 commits/s); the total with devices over devices is reported
beside it. The
safety net re-check (``fleet.changes``) runs every ``safety_net_s`` (default 30 s, as
``fleetctl serve`` by default) at one query per replica for all its streams, so it is part of
the figure but does not grow with devices.

PostgreSQL ≥ 15 publishes a backend's counters at most once a second and an idle backend's
after up to 10 s, so each phase waits ``STATS_SETTLE_S`` before its first reading and the
interval should be long against that; the readings go through the server's ``postgres``
database, so they add nothing to the count. Each phase starts with a ``VACUUM (ANALYZE)``, so
that autovacuum (not the control plane) finds nothing to do during the interval; what is left
is the replicas' own: advisory-lock attempts, the leader's rollout tick, health probes, CRL
refreshes, the safety net. A per-device figure below 0 means the difference is noise.
bench.replicas uses ``commits_per_second`` and ``idle_figures`` on its own cluster. The last
stdout line is JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

import psycopg
from sqlalchemy.engine import make_url

from bench.replicas_notify import connected_fleets, replica_cluster
from bench.services import replica_services
from edgefleet.controlplane.trust.keys import KeyDir

STATS_SETTLE_S = 12.0  # > PostgreSQL's 10 s flush delay for an idle backend's statistics
TARGET_COMMITS_PER_DEVICE_S = 0.001


def xact_commits(db_url: str) -> int:
    """``db_url``'s committed transactions so far (pg_stat_database), read afresh through the
    server's ``postgres`` database, so the reading adds no commit to the count it reads."""
    url = make_url(db_url)
    observer = url.set(drivername="postgresql", database="postgres").render_as_string(hide_password=False)
    with psycopg.connect(observer, autocommit=True) as conn:
        row = conn.execute(
            "SELECT xact_commit FROM pg_stat_database WHERE datname = %s", (url.database,)
        ).fetchone()
    if row is None:
        raise LookupError(f"no statistics for database {url.database!r}")
    return int(row[0])


def vacuum(db_url: str) -> None:
    """``VACUUM (ANALYZE)`` of the whole database: after migrations or a thousand enrollments,
    autovacuum would otherwise visit the new rows table by table during the interval, and its
    transactions count in ``xact_commit`` though the control plane made none of them."""
    libpq = make_url(db_url).set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(libpq, autocommit=True) as conn:
        conn.execute("VACUUM (ANALYZE)")


async def commits_per_second(db_url: str, interval_s: float, *, settle_s: float = STATS_SETTLE_S) -> float:
    """Commits/s of the database over ``interval_s``, after ``vacuum`` and ``settle_s``, so
    that what happened before (start-up, devices connecting, the vacuum) is already counted.
    Both readings lag behind by the same flush delays, so the difference is ``interval_s``
    worth of commits."""
    await asyncio.to_thread(vacuum, db_url)
    await asyncio.sleep(settle_s)
    before, started = await asyncio.to_thread(xact_commits, db_url), time.monotonic()
    await asyncio.sleep(interval_s)
    after, ended = await asyncio.to_thread(xact_commits, db_url), time.monotonic()
    return (after - before) / (ended - started)


def idle_figures(*, devices: int, baselines: list[float], with_devices: float) -> dict[str, Any]:
    """Per-device cost = (commits/s with devices - commits/s without) / devices, and the verdict.
    With several baselines the lowest counts: whatever else made commits in an interval (a busy
    machine, start-up) then raises the cost found, never hides it."""
    baseline = min(baselines)
    per_device = (with_devices - baseline) / devices  # below 0: the noise is larger than the cost
    return {
        "baseline_commits_per_s": round(baseline, 4),
        "baselines_commits_per_s": [round(b, 4) for b in baselines],
        "commits_per_s_with_devices": round(with_devices, 4),
        "commits_per_s_per_idle_device": round(per_device, 6),
        "commits_per_s_total_per_device": round(with_devices / devices, 6),
        "target_per_device": TARGET_COMMITS_PER_DEVICE_S,
        "met": per_device <= TARGET_COMMITS_PER_DEVICE_S,
    }


async def measure_idle_commits(
    *,
    db_url: str,
    mqtt_url: str,
    keys: KeyDir,
    work: Path,
    devices: int = 200,
    replicas: int = 2,
    interval_s: float = 60.0,
    safety_net_s: float = 30.0,
) -> dict[str, Any]:
    """Database commits/s per idle connected device (``devices`` streams over ``replicas``)."""
    async with replica_cluster(
        db_url=db_url,
        mqtt_url=mqtt_url,
        keys=keys,
        work=work,
        devices=0,
        replicas=replicas,
        safety_net_s=safety_net_s,
    ) as cluster:
        before = await commits_per_second(db_url, interval_s)
        async with connected_fleets(cluster, devices):
            with_devices = await commits_per_second(db_url, interval_s)
        after = await commits_per_second(db_url, interval_s)
    return {
        "devices": devices,
        "replicas": replicas,
        "interval_s": interval_s,
        "safety_net_s": safety_net_s,
        **idle_figures(devices=devices, baselines=[before, after], with_devices=with_devices),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--devices", type=int, default=200)
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--interval", type=float, default=60.0)
    parser.add_argument("--safety-net", type=float, default=30.0)
    args = parser.parse_args(argv)
    with replica_services("edgefleet-idle-") as shared:
        result = asyncio.run(
            measure_idle_commits(
                db_url=shared.db_url,
                mqtt_url=shared.mqtt_url,
                keys=shared.keys,
                work=shared.work,
                devices=args.devices,
                replicas=args.replicas,
                interval_s=args.interval,
                safety_net_s=args.safety_net,
            )
        )
    line = {
        "benchmark": "replicas_idle",
        "figures": result,
        "baseline": {"commits_per_s_without_devices": result["baseline_commits_per_s"]},
        "ratio": round(result["commits_per_s_with_devices"] / result["baseline_commits_per_s"], 3)
        if result["baseline_commits_per_s"] > 0
        else None,
        "ratio_of": "commits/s with every device connected / with none",
        "target": {"commits_per_s_per_idle_device_max": TARGET_COMMITS_PER_DEVICE_S},
        "met": result["met"],
    }
    print(json.dumps(line), file=sys.stdout)


if __name__ == "__main__":
    main()
