"""Fan-out: how fast the control plane gets a new desired state to every connected device,
what each connected device costs it in memory, and how fast devices enroll.

    python -m bench.fanout [--quick] [--sizes 100,1000,10000] [--db sqlite|postgres]
                           [--via broker|stream] [--devices-per-worker 2500]

For each fleet size (default 100, 1000 and 10000 devices; --quick: 100 and 200; the first size
is the baseline) a fresh control plane runs as a child process (``fleetctl serve`` on SQLite
under a temp dir, or with ``--db postgres`` on a throwaway PostgreSQL database of its own; a
Mosquitto of our own or the embedded broker; device certificates valid 30 days), and worker
processes play the fleet (bench.sim_pool: bench.sim_fleet in each): every device enrolls with a
token and a CSR and reports VERIFYING then ACTIVE on every nudge over its own mutual-TLS
channel. How it hears of a nudge (``--via``): ``broker`` (the agent's default) — each device
holds its own MQTT connection to the benchmark's Mosquitto, subscribed to its desired topic,
and the control plane closes its gRPC connection after IDLE_SECONDS without a call
(``--max-connection-idle-seconds``; the agent's channel also lets go by itself), so an idle
device holds nothing on the control plane; ``stream`` — each holds a desired-state stream open.
The simulated devices load, verify and download nothing,
so this measures the control plane's fan-out and state tracking, not agents. The control plane
is alone in its child, so the child's RSS is the control plane's own.

The fleet is spread over ceil(N / --devices-per-worker) processes so that simulating it is
not what is timed. Each run reports ``fleet_cpu_max``, the busiest worker's CPU time over the
wall time of the deploy's fan-out (the call until every device received its generation; 1.0 =
one core saturated), and ``cp_cpu`` the same for the control plane (2.0 = two cores): the
fleet is not the bottleneck while its workers stay well below 1.0 and the control plane is
the busier side. Checked at 10,000 devices on SQLite over 4 workers: the control plane used
~0.9 of a core (its one Python thread), the busiest worker 0.1 over the whole deploy. (On a
2-core machine more workers than cores cannot add CPU; the check is the workers' headroom.)

Measured per size, after a warm-up deployment that proves every stream is registered:

- enrollment: devices per second from the first Enroll call to the last certificate
  (``enroll_per_s``; 32 calls in flight per worker), and the control plane's RSS then;
- deploy: how long the ``Deploy`` call (all devices, a new release) took (``deploy_call_s``);
  from the call until every device received its new generation on its stream
  (``deploy_fanout_s``), and until the control plane acknowledged every device's ACTIVE report
  (``*_reported_s``);
- rollout fan-out: the same from calling ``CreateRollout`` (one wave of 100%, no soak, no
  gates, max_concurrent 0), and until GetRollout says COMPLETED; reported as null, with a
  note, while the control plane answers UNIMPLEMENTED;
- memory: the control plane's RSS (psutil, child pid) with every device connected and idle,
  minus its RSS before any device enrolled, over N, in KiB (``cp_kib_per_connected_device``);
  split into what enrollment left (``cp_kib_per_enrolled_device``: RSS after enrolling, no
  stream open yet) and what a connection with its stream adds (``cp_kib_per_connection``);
  also after the fan-outs. Enrollment's share is mostly paid once (caches and pools warming
  up: ~13 MiB at 200 devices, ~14 at 2000), so at small N the per-device figure overstates
  a device's cost; ``cp_kib_per_added_device`` is the growth from the first size to the
  largest over the devices added, which leaves that out.

Baseline and ratio: the per-device time of the deploy's fan-out (seconds over N) at the
largest N divided by that at the first size, in the same run (``ratio_of``; the rollout's,
which adds the engine's fixed tick, and the reports' are under ``scaling``). Targets
(``targets``, each judged at the largest size in ``met``): ratio <= 1.5; the Deploy call
<= 1 ms per device; every device holds the new desired state <= 10 s after the Deploy call,
and after CreateRollout for one wave of every device;
<= 64 KiB of control-plane RSS per idle connected device; enrollment >= 100 devices/s.
Most of a stream's memory is gRPC core's, not the control plane's code (TLS, transport and
read buffers, ~80 KiB: bench.connection_memory); with ``--via broker`` there is none while idle
(``cp_connections_connected`` and ``cp_connections_after_fanout`` count the established device
connections), and ``broker_kib_per_connection`` is what a device costs Mosquitto instead (its
RSS growth over N; plain MQTT here, TLS adds the broker's OpenSSL buffers).
Progress goes to stderr; the last stdout line is JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import grpc
import psutil

from bench.fanout_figures import Run, summary
from bench.services import postgres_server, start_broker, throwaway_database
from bench.sim_fleet import build_sim_bundle
from bench.sim_pool import FleetPool, FleetSpec, WorkerStats, workers_for
from edgefleet.controlplane.cli.child_process import Processes
from edgefleet.controlplane.cli.client import operator_stub, publish_bundle
from edgefleet.controlplane.cli.demo import check_alive, free_port, health_serving, serve_command, wait_for
from edgefleet.controlplane.fleet.rbac import ADMIN_TOKEN_FILE
from edgefleet.controlplane.trust.keys import KeyDir, init_keys
from edgefleet.controlplane.trust.tls import channel_credentials
from edgefleet.protos.fleet.v1 import common_pb2, operator_pb2, operator_pb2_grpc

BASELINE_SIZE = 100
SIZES = (BASELINE_SIZE, 1000, 10000)
QUICK_SIZES = (BASELINE_SIZE, 200)
DEVICES_PER_WORKER = 2500
CERT_VALIDITY = "30d"  # no simulated device renews during a run
BUNDLE = "simlm"
DATABASES = ("sqlite", "postgres")
VIAS = ("broker", "stream")
IDLE_SECONDS = 5.0  # the control plane closes a device connection without a call after this


def progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def raise_fd_limit() -> int:
    """Lifts this process's open-file limit to the hard limit: the control plane (a child,
    inheriting it) holds a socket per device, and so does each fleet worker."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def rss_mib(pid: int | None = None) -> float:
    return float(psutil.Process(pid).memory_info().rss) / 2**20


def device_connections(cp: ControlPlane) -> int:
    """Established TCP connections on the control plane's device port: what devices hold open."""
    port = int(cp.device_target.rpartition(":")[2])
    return sum(
        1
        for c in psutil.Process(cp.pid).net_connections(kind="tcp")
        if c.status == psutil.CONN_ESTABLISHED and c.laddr and c.laddr.port == port
    )


def cpu_s(pid: int) -> float:
    times = psutil.Process(pid).cpu_times()
    return float(times.user + times.system)


Database = Callable[[], AbstractContextManager[str | None]]
"""A fresh database for one size: its SQLAlchemy URL, or None for SQLite under the data dir."""


@dataclass(frozen=True)
class Setup:
    """What every size shares: keys, the releases to push, the broker, the database, limits."""

    work: Path
    keys: KeyDir
    bundles: tuple[Path, ...]  # v1 warms up, v2 is deployed, v3 rolled out
    mqtt_url: str | None  # None: the control plane's embedded broker
    broker_pid: int | None  # our Mosquitto's, to measure what device connections cost it
    via: str  # how devices hear of changes: "broker" (notices) or "stream"
    database: Database
    devices_per_worker: int
    settle_s: float
    within_s: float


@contextmanager
def broker(work: Path) -> Iterator[tuple[str, int | None] | None]:
    """A Mosquitto of our own (its URL and pid) when installed; else None, and the control
    plane embeds one."""
    if shutil.which("mosquitto") is None and not Path("/usr/sbin/mosquitto").exists():
        progress("mosquitto not installed: the control plane runs its embedded broker")
        yield None
        return
    own = start_broker(work / "mosquitto")
    try:
        yield own.url, own.proc.pid if own.proc is not None else None
    finally:
        own.stop()


@dataclass(frozen=True)
class ControlPlane:
    """A control plane child ready for one size: its releases pushed, a token for the fleet."""

    pid: int
    target: str
    device_target: str
    admin: str
    token: str
    releases: list[common_pb2.BundleRef]


def start_control_plane(procs: Processes, size: int, setup: Setup, db_url: str | None) -> ControlPlane:
    """Blocking: starts ``fleetctl serve``, pushes the releases, makes a token for ``size``."""
    work = setup.work / f"n{size}"
    ca_pem = setup.keys.tls_ca_path.read_bytes()
    target, device_target = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    extra = ["--device-cert-validity", CERT_VALIDITY, "--log-level", "WARNING"]
    # Idle device connections close after IDLE_SECONDS (default ten minutes), so a run sees
    # devices go idle; a stream is a call, so its connection is never idle.
    extra += ["--max-connection-idle-seconds", str(IDLE_SECONDS)]
    if setup.mqtt_url is not None:
        extra += ["--mqtt", setup.mqtt_url]
    if db_url is not None:
        extra += ["--db", db_url]
    child = procs.start(
        "control plane",
        serve_command(
            target=target,
            device_target=device_target,
            data_dir=work / "cp",
            keys_dir=setup.keys.path,
            extra=extra,
        ),
        setup.work / f"controlplane-{size}.log",
    )

    def up() -> bool | None:
        check_alive(procs)
        return health_serving(target, ca_pem)

    wait_for("the control plane", up, timeout=60)
    admin = (work / "cp" / ADMIN_TOKEN_FILE).read_text().strip()
    channel, stub = operator_stub(target, admin, ca_pem=ca_pem)
    with channel:
        releases = [publish_bundle(stub, path, setup.keys.release_signers()).bundle for path in setup.bundles]
        token = stub.CreateToken(operator_pb2.CreateTokenRequest(uses=size, ttl_seconds=3600)).token
    return ControlPlane(child.pid, target, device_target, admin, token, releases)


async def measure(size: int, setup: Setup) -> tuple[Run, list[str]]:
    """One size on a fresh control plane and database, both gone afterwards.

    Every size runs on the one event loop of the benchmark: grpc.aio binds itself to the
    first loop it sees, and a second ``asyncio.run`` gets its callbacks on a closed loop.
    """
    with ExitStack() as stack:
        db_url = stack.enter_context(setup.database())
        procs = Processes()
        try:
            cp = await asyncio.to_thread(start_control_plane, procs, size, setup, db_url)
            await asyncio.sleep(setup.settle_s)
            run = Run(devices=size, cp_rss_idle_mib=rss_mib(cp.pid))
            notes = await fan_out(run, setup, cp)
            check_alive(procs)
            return run, notes
        finally:
            await asyncio.to_thread(procs.stop)


async def fan_out(run: Run, setup: Setup, cp: ControlPlane) -> list[str]:
    """The fleet's part: enroll and connect, warm up, then the measured deploy and rollout."""
    ca_pem = setup.keys.tls_ca_path.read_bytes()
    spec = FleetSpec(
        target=cp.target,
        device_target=cp.device_target,
        ca_pem=ca_pem,
        token=cp.token,
        size=run.devices,
        notices=setup.via == "broker",
        # The control plane closes idle connections (--max-connection-idle-seconds); gRPC's
        # client idle timer across 2,500 channels of one process broke a worker (a gRPC core
        # abort, memory_quota.cc) in two of three 10,000-device runs, so the fleet leaves it off.
        idle_seconds=None,
    )
    broker_pid = setup.broker_pid
    async with (
        FleetPool(spec, workers_for(run.devices, setup.devices_per_worker)) as fleet,
        grpc.aio.secure_channel(cp.target, channel_credentials(ca_pem)) as channel,
    ):
        run.workers = fleet.workers
        sim_before = sum(s.rss_mib for s in await fleet.stats())
        run.enroll_s = await fleet.enroll()
        await asyncio.sleep(setup.settle_s)
        run.cp_rss_enrolled_mib = rss_mib(cp.pid)
        run.broker_rss_idle_mib = rss_mib(broker_pid) if broker_pid else None
        run.connect_s = await fleet.connect()
        progress(
            f"  {fleet.workers} fleet worker(s): enrolled in {run.enroll_s:.1f}s "
            f"({run.enroll_per_s:.0f}/s), connected in {run.connect_s:.1f}s"
        )
        await asyncio.sleep(setup.settle_s)
        run.cp_rss_connected_mib = rss_mib(cp.pid)
        run.cp_connections_connected = device_connections(cp)
        run.broker_rss_connected_mib = rss_mib(broker_pid) if broker_pid else None
        run.sim_rss_per_device_kib = (
            (sum(s.rss_mib for s in await fleet.stats()) - sim_before) * 1024 / run.devices
        )
        op = operator_pb2_grpc.OperatorServiceStub(channel)
        auth = (("authorization", f"Bearer {cp.admin}"),)
        warm, deployed, rolled = cp.releases

        # Warm-up: every stream delivers a generation, so every stream is registered.
        await fleet.arm()
        started = time.monotonic()
        await op.Deploy(operator_pb2.DeployRequest(bundle=warm, all_devices=True), metadata=auth)
        await fleet.wait("reported", setup.within_s, since=started)

        await fleet.arm()
        fleet_before, cp_before = await fleet.stats(), cpu_s(cp.pid)
        started = time.monotonic()
        await op.Deploy(operator_pb2.DeployRequest(bundle=deployed, all_devices=True), metadata=auth)
        run.deploy_call_s = time.monotonic() - started
        run.deploy_fanout_s = await fleet.wait("generation", setup.within_s, since=started)
        spread = await fleet.crossings("generation", since=started)
        run.deploy_fanout_p50_s = spread[len(spread) // 2]
        run.deploy_fanout_p90_s = spread[min(len(spread) - 1, len(spread) * 9 // 10)]
        wall = time.monotonic() - started
        run.fleet_cpu_max = busiest(fleet_before, await fleet.stats(), wall)
        run.cp_cpu = (cpu_s(cp.pid) - cp_before) / wall
        run.deploy_reported_s = await fleet.wait("reported", setup.within_s, since=started)
        progress(
            f"  deploy: call {run.deploy_call_s:.2f}s, received by half in {run.deploy_fanout_p50_s:.2f}s, "
            f"90% in {run.deploy_fanout_p90_s:.2f}s, all in {run.deploy_fanout_s:.2f}s, "
            f"all reported in {run.deploy_reported_s:.2f}s (CPU: busiest fleet worker "
            f"{run.fleet_cpu_max:.2f}, control plane {run.cp_cpu:.2f})"
        )

        notes = await roll_out(run, fleet, op, auth, rolled, setup.within_s)
        # With notices the devices' channels let their connections go once idle: wait for that
        # (gRPC's idle timer fires between one and two idle periods after the last call).
        await asyncio.sleep(setup.settle_s + (2 * IDLE_SECONDS if setup.via == "broker" else 0.0))
        run.cp_rss_after_fanout_mib = rss_mib(cp.pid)
        run.cp_connections_after_fanout = device_connections(cp)
    return notes


def busiest(before: list[WorkerStats], after: list[WorkerStats], wall: float) -> float:
    """The largest share of one core any fleet worker used over ``wall`` seconds."""
    return max((b.cpu_s - a.cpu_s) / wall for a, b in zip(before, after, strict=True))


async def roll_out(
    run: Run,
    fleet: FleetPool,
    op: operator_pb2_grpc.OperatorServiceStub,
    auth: tuple[tuple[str, str], ...],
    release: common_pb2.BundleRef,
    within: float,
) -> list[str]:
    """One wave of 100%, no soak, no gates, no concurrency limit; [] or why it was not measured."""
    await fleet.arm()
    name = f"fanout-{run.devices}-{int(time.time())}"
    request = operator_pb2.CreateRolloutRequest(
        name=name,
        bundle=release,
        waves=[operator_pb2.WaveSpec(percent=100)],
        soak_seconds=0,
        max_concurrent=0,
    )
    started = time.monotonic()
    try:
        await op.CreateRollout(request, metadata=auth)
    except grpc.aio.AioRpcError as exc:
        if exc.code() != grpc.StatusCode.UNIMPLEMENTED:
            raise
        progress("  rollout: CreateRollout is not implemented yet; not measured")
        return ["CreateRollout answered UNIMPLEMENTED: rollout fan-out not measured, ratio uses Deploy"]
    run.rollout_fanout_s = await fleet.wait("generation", within, since=started)
    run.rollout_reported_s = await fleet.wait("reported", within, since=started)
    deadline = started + within
    lookup = operator_pb2.GetRolloutRequest(name=name)
    while True:
        rollout = await op.GetRollout(lookup, metadata=auth)
        if rollout.state == operator_pb2.ROLLOUT_STATE_COMPLETED:
            run.rollout_completed_s = time.monotonic() - started
            break
        if rollout.state not in (operator_pb2.ROLLOUT_STATE_RUNNING, operator_pb2.ROLLOUT_STATE_UNSPECIFIED):
            raise RuntimeError(
                f"rollout {name} ended {operator_pb2.RolloutState.Name(rollout.state)}: {rollout.reason}"
            )
        if time.monotonic() > deadline:
            raise TimeoutError(f"rollout {name} not COMPLETED after {within:.0f}s")
        await asyncio.sleep(0.25)
    progress(
        f"  rollout: all received in {run.rollout_fanout_s:.2f}s, all reported in "
        f"{run.rollout_reported_s:.2f}s, COMPLETED after {run.rollout_completed_s:.2f}s"
    )
    return []


async def measure_all(sizes: tuple[int, ...], setup: Setup) -> tuple[list[Run], list[str]]:
    runs: list[Run] = []
    notes: list[str] = []
    for size in sizes:
        progress(f"{size} devices")
        run, said = await measure(size, setup)
        runs.append(run)
        notes += [n for n in said if n not in notes]
    return runs, notes


def parse_sizes(text: str) -> tuple[int, ...]:
    """``100,1000,10000`` -> (100, 1000, 10000): positive, increasing; the first is the baseline."""
    try:
        sizes = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of device counts: {text!r}") from None
    if not sizes or sizes[0] <= 0 or list(sizes) != sorted(set(sizes)):
        raise argparse.ArgumentTypeError(f"sizes must be positive and increasing: {text!r}")
    return sizes


@contextmanager
def databases(kind: str) -> Iterator[Database]:
    """Where each size's control plane keeps its store: SQLite under its data dir, or a fresh
    throwaway database on a PostgreSQL server (the machine's or one of our own) per size."""
    if kind == "sqlite":
        yield lambda: nullcontext(None)
        return
    with postgres_server() as admin:
        yield lambda: throwaway_database(admin)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.fanout", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="100 and 200 devices, shorter settling")
    parser.add_argument(
        "--sizes",
        type=parse_sizes,
        help="comma-separated fleet sizes, the first the baseline (default: 100,1000,10000)",
    )
    parser.add_argument("--db", choices=DATABASES, default="sqlite", help="the control plane's store")
    parser.add_argument(
        "--via",
        choices=VIAS,
        default="broker",
        help="how devices hear of changes: notices on their own MQTT connection (the agent's "
        "default) or a desired-state stream each holds open (default %(default)s)",
    )
    parser.add_argument(
        "--devices-per-worker",
        type=int,
        default=DEVICES_PER_WORKER,
        help="simulated devices per fleet process (default %(default)s)",
    )
    args = parser.parse_args(argv)
    if args.devices_per_worker <= 0:
        parser.error("--devices-per-worker must be positive")
    sizes: tuple[int, ...] = args.sizes or (QUICK_SIZES if args.quick else SIZES)
    files = raise_fd_limit()
    # gRPC core logs every GOAWAY at INFO; idle connections closing are expected here.
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    with tempfile.TemporaryDirectory(prefix="edgefleet-fanout-") as tmp:
        work = Path(tmp)
        keys = init_keys(work / "keys")
        bundles = tuple(
            build_sim_bundle(work / "bundles", keys.release_signers(), name=BUNDLE, version=v).path
            for v in (1, 2, 3)
        )
        with broker(work) as own_broker, databases(args.db) as database:
            via = args.via
            if own_broker is None and via == "broker":
                # Simulated listeners speak plain MQTT; the embedded broker wants device TLS.
                progress("no Mosquitto: devices hold desired-state streams instead of listening")
                via = "stream"
            setup = Setup(
                work=work,
                keys=keys,
                bundles=bundles,
                mqtt_url=own_broker[0] if own_broker else None,
                broker_pid=own_broker[1] if own_broker else None,
                via=via,
                database=database,
                devices_per_worker=args.devices_per_worker,
                settle_s=2.0 if args.quick else 5.0,
                within_s=120.0 if args.quick else 600.0,
            )
            runs, notes = asyncio.run(measure_all(sizes, setup))
        settings = {
            "sizes": list(sizes),
            "open_files_limit": files,
            "broker": "mosquitto" if setup.mqtt_url else "embedded",
            "database": args.db,
            "via": setup.via,
            "devices_per_worker": args.devices_per_worker,
            "device_cert_validity": CERT_VALIDITY,
            "settle_s": setup.settle_s,
        }
    print(json.dumps(summary(runs, notes, settings)))


if __name__ == "__main__":
    main()
