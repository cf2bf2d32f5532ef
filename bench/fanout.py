"""Fan-out: how fast the control plane gets a new desired state to every connected device,
and what each connected device costs it in memory.

    python -m bench.fanout [--quick]

For each fleet size (100, 1000 and 2000 devices; --quick: 100 and 200) a fresh control plane
runs as a child process (``fleetctl serve``, SQLite under a temp dir, a Mosquitto of our own
or the embedded broker, device certificates valid 30 days), and this process plays the fleet
with bench.sim_fleet: every device enrolls with a token and a CSR, holds its desired-state
stream over its own mutual-TLS channel and reports VERIFYING then ACTIVE on every nudge. The
simulated devices load, verify and download nothing, so this measures the control plane's
fan-out and state tracking, not agents. The fleet lives in this process and the control plane
alone in its child, so the child's RSS is the control plane's own.

Measured per size, after a warm-up deployment that proves every stream is registered:

- deploy fan-out: from calling ``Deploy`` (all devices, a new release) until every device
  received its new generation on its stream; and until the control plane acknowledged every
  device's ACTIVE report (``*_reported_s``);
- rollout fan-out: the same from calling ``CreateRollout`` (one wave of 100%, no soak, no
  gates, max_concurrent 0), and until GetRollout says COMPLETED; reported as null, with a
  note, while the control plane answers UNIMPLEMENTED;
- memory: the control plane's RSS (psutil, child pid) with every device connected and idle,
  minus its RSS before any device enrolled, over N, in KiB; also after the fan-outs.

Baseline and ratio: the per-device fan-out time (seconds over N) at the largest N divided by
the per-device time of the same fan-out at 100 devices, in the same run. Target <= 2.0: the
fan-out grows close to linearly with the fleet (a fixed cost per call makes it < 1). The
rollout's fan-out is the one compared when every size measured it, else the deploy's
(``ratio_of``). Memory target (``targets``): at most 128 KiB of control-plane RSS per
connected device, i.e. 10,000 devices in 1.25 GiB. Most of it is the connection itself, not
the control plane's code: a mutual-TLS HTTP/2 connection with no stream open measured about
90 KiB in the gRPC core (TLS and transport buffers), an open desired-state stream about 25 KiB
more; so this guards against regressions in what the control plane adds per device.
Progress goes to stderr; the last stdout line is JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import grpc
import psutil

from bench.services import start_broker
from bench.sim_fleet import SimFleet, build_sim_bundle
from edgefleet.controlplane.cli.child_process import Processes
from edgefleet.controlplane.cli.client import operator_stub, publish_bundle
from edgefleet.controlplane.cli.demo import check_alive, free_port, health_serving, serve_command, wait_for
from edgefleet.controlplane.fleet.rbac import ADMIN_TOKEN_FILE
from edgefleet.controlplane.trust.keys import KeyDir, init_keys
from edgefleet.controlplane.trust.tls import channel_credentials
from edgefleet.protos.fleet.v1 import common_pb2, operator_pb2, operator_pb2_grpc

BASELINE_SIZE = 100
SIZES = (BASELINE_SIZE, 1000, 2000)
QUICK_SIZES = (BASELINE_SIZE, 200)
TARGET_RATIO = 2.0
TARGET_KIB_PER_DEVICE = 128.0
CERT_VALIDITY = "30d"  # no simulated device renews during a run
BUNDLE = "simlm"


def progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def raise_fd_limit() -> int:
    """Lifts this process's open-file limit to the hard limit: every simulated device holds a
    socket here, and the control plane (a child, inheriting it) one per device there."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def rss_mib(pid: int | None = None) -> float:
    return float(psutil.Process(pid).memory_info().rss) / 2**20


@dataclass
class Run:
    """One fleet size on a fresh control plane; seconds, MiB and KiB."""

    devices: int
    enroll_s: float = 0.0
    connect_s: float = 0.0
    deploy_call_s: float = 0.0
    deploy_fanout_s: float = 0.0
    deploy_reported_s: float = 0.0
    rollout_fanout_s: float | None = None
    rollout_reported_s: float | None = None
    rollout_completed_s: float | None = None
    cp_rss_idle_mib: float = 0.0
    cp_rss_connected_mib: float = 0.0
    cp_rss_after_fanout_mib: float = 0.0
    # This process's RSS growth per simulated device. Later sizes reuse memory the earlier
    # ones freed, so only the first size's figure is the simulator's full cost.
    sim_rss_per_device_kib: float = 0.0

    @property
    def cp_kib_per_connected_device(self) -> float:
        return (self.cp_rss_connected_mib - self.cp_rss_idle_mib) * 1024 / self.devices

    @property
    def cp_kib_per_device_after_fanout(self) -> float:
        return (self.cp_rss_after_fanout_mib - self.cp_rss_idle_mib) * 1024 / self.devices

    def figures(self) -> dict[str, Any]:
        rounded = {k: round(v, 3) if isinstance(v, float) else v for k, v in asdict(self).items()}
        return {
            **rounded,
            "cp_kib_per_connected_device": round(self.cp_kib_per_connected_device, 1),
            "cp_kib_per_device_after_fanout": round(self.cp_kib_per_device_after_fanout, 1),
        }


@dataclass(frozen=True)
class Setup:
    """What every size shares: keys, the releases to push, the broker, the time limits."""

    work: Path
    keys: KeyDir
    bundles: tuple[Path, ...]  # v1 warms up, v2 is deployed, v3 rolled out
    mqtt_url: str | None  # None: the control plane's embedded broker
    settle_s: float
    within_s: float


@contextmanager
def broker(work: Path) -> Iterator[str | None]:
    """A Mosquitto of our own when installed; else None, and the control plane embeds one."""
    if shutil.which("mosquitto") is None and not Path("/usr/sbin/mosquitto").exists():
        progress("mosquitto not installed: the control plane runs its embedded broker")
        yield None
        return
    own = start_broker(work / "mosquitto")
    try:
        yield own.url
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


def start_control_plane(procs: Processes, size: int, setup: Setup) -> ControlPlane:
    """Blocking: starts ``fleetctl serve``, pushes the releases, makes a token for ``size``."""
    work = setup.work / f"n{size}"
    ca_pem = setup.keys.tls_ca_path.read_bytes()
    target, device_target = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    extra = ["--device-cert-validity", CERT_VALIDITY, "--log-level", "WARNING"]
    if setup.mqtt_url is not None:
        extra += ["--mqtt", setup.mqtt_url]
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
    """One size on a fresh control plane, stopped afterwards.

    Every size runs on the one event loop of the benchmark: grpc.aio binds itself to the
    first loop it sees, and a second ``asyncio.run`` gets its callbacks on a closed loop.
    """
    procs = Processes()
    try:
        cp = await asyncio.to_thread(start_control_plane, procs, size, setup)
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
    sim_before = rss_mib()
    async with (
        SimFleet(
            target=cp.target, device_target=cp.device_target, ca_pem=ca_pem, token=cp.token, size=run.devices
        ) as fleet,
        grpc.aio.secure_channel(cp.target, channel_credentials(ca_pem)) as channel,
    ):
        run.enroll_s, run.connect_s = fleet.enrolled_s, fleet.connected_s
        progress(f"  enrolled in {fleet.enrolled_s:.1f}s, connected in {fleet.connected_s:.1f}s")
        await asyncio.sleep(setup.settle_s)
        run.cp_rss_connected_mib = rss_mib(cp.pid)
        run.sim_rss_per_device_kib = (rss_mib() - sim_before) * 1024 / run.devices
        op = operator_pb2_grpc.OperatorServiceStub(channel)
        auth = (("authorization", f"Bearer {cp.admin}"),)
        warm, deployed, rolled = cp.releases

        # Warm-up: every stream delivers a generation, so every stream is registered.
        goals = next_generations(fleet)
        await op.Deploy(operator_pb2.DeployRequest(bundle=warm, all_devices=True), metadata=auth)
        await fleet.wait_reported(goals, setup.within_s)

        goals = next_generations(fleet)
        started = time.monotonic()
        await op.Deploy(operator_pb2.DeployRequest(bundle=deployed, all_devices=True), metadata=auth)
        run.deploy_call_s = time.monotonic() - started
        run.deploy_fanout_s = await fleet.wait_generation(goals, setup.within_s, since=started)
        run.deploy_reported_s = await fleet.wait_reported(goals, setup.within_s, since=started)
        progress(
            f"  deploy: all received in {run.deploy_fanout_s:.2f}s, "
            f"all reported in {run.deploy_reported_s:.2f}s"
        )

        notes = await roll_out(run, fleet, op, auth, rolled, setup.within_s)
        await asyncio.sleep(setup.settle_s)
        run.cp_rss_after_fanout_mib = rss_mib(cp.pid)
    return notes


def next_generations(fleet: SimFleet) -> dict[str, int]:
    """Each device's generation after one more assignment (generations are per device)."""
    return {d.device_id: d.generation + 1 for d in fleet.devices}


async def roll_out(
    run: Run,
    fleet: SimFleet,
    op: operator_pb2_grpc.OperatorServiceStub,
    auth: tuple[tuple[str, str], ...],
    release: common_pb2.BundleRef,
    within: float,
) -> list[str]:
    """One wave of 100%, no soak, no gates, no concurrency limit; [] or why it was not measured."""
    goals = next_generations(fleet)
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
    run.rollout_fanout_s = await fleet.wait_generation(goals, within, since=started)
    run.rollout_reported_s = await fleet.wait_reported(goals, within, since=started)
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


def summary(runs: list[Run], notes: list[str], settings: dict[str, Any]) -> dict[str, Any]:
    baseline, largest = runs[0], runs[-1]
    by_rollout = all(r.rollout_fanout_s is not None for r in runs)
    of = "rollout" if by_rollout else "deploy"

    def fanout(run: Run) -> float:
        value = run.rollout_fanout_s if by_rollout else run.deploy_fanout_s
        assert value is not None
        return value

    base_ms = fanout(baseline) * 1000 / baseline.devices
    top_ms = fanout(largest) * 1000 / largest.devices
    ratio = top_ms / base_ms if base_ms > 0 else float("inf")
    memory = largest.cp_kib_per_connected_device

    def scaling(seconds: Callable[[Run], float | None]) -> float | None:
        """Per-device time at the largest size over that at the baseline size."""
        top, base = seconds(largest), seconds(baseline)
        if top is None or base is None or base <= 0:
            return None
        return round((top / largest.devices) / (base / baseline.devices), 3)

    return {
        "benchmark": "fanout",
        "figures": {
            "devices": largest.devices,
            "fanout_s": round(fanout(largest), 3),
            "fanout_ms_per_device": round(top_ms, 3),
            "deploy_fanout_s": round(largest.deploy_fanout_s, 3),
            "rollout_fanout_s": None
            if largest.rollout_fanout_s is None
            else round(largest.rollout_fanout_s, 3),
            "cp_kib_per_connected_device": round(memory, 1),
            "scaling": {
                "deploy": scaling(lambda r: r.deploy_fanout_s),
                "rollout": scaling(lambda r: r.rollout_fanout_s),
                "deploy_reported": scaling(lambda r: r.deploy_reported_s),
                "rollout_reported": scaling(lambda r: r.rollout_reported_s),
            },
            "runs": [
                {
                    **r.figures(),
                    "deploy_ms_per_device": round(r.deploy_fanout_s * 1000 / r.devices, 3),
                    "rollout_ms_per_device": None
                    if r.rollout_fanout_s is None
                    else round(r.rollout_fanout_s * 1000 / r.devices, 3),
                }
                for r in runs
            ],
        },
        "baseline": {
            "devices": baseline.devices,
            "fanout_s": round(fanout(baseline), 3),
            "fanout_ms_per_device": round(base_ms, 3),
        },
        "ratio": round(ratio, 3),
        "ratio_of": of,
        "target": TARGET_RATIO,
        "targets": {
            "ratio_max": TARGET_RATIO,
            "cp_kib_per_connected_device_max": TARGET_KIB_PER_DEVICE,
        },
        "met": {
            "ratio": ratio <= TARGET_RATIO,
            "cp_kib_per_connected_device": memory <= TARGET_KIB_PER_DEVICE,
        },
        "notes": notes,
        "settings": settings,
    }


async def measure_all(sizes: tuple[int, ...], setup: Setup) -> tuple[list[Run], list[str]]:
    runs: list[Run] = []
    notes: list[str] = []
    for size in sizes:
        progress(f"{size} devices")
        run, said = await measure(size, setup)
        runs.append(run)
        notes += [n for n in said if n not in notes]
    return runs, notes


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.fanout", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="100 and 200 devices, shorter settling")
    args = parser.parse_args(argv)
    sizes = QUICK_SIZES if args.quick else SIZES
    files = raise_fd_limit()
    with tempfile.TemporaryDirectory(prefix="edgefleet-fanout-") as tmp:
        work = Path(tmp)
        keys = init_keys(work / "keys")
        bundles = tuple(
            build_sim_bundle(work / "bundles", keys.release_signers(), name=BUNDLE, version=v).path
            for v in (1, 2, 3)
        )
        with broker(work) as mqtt_url:
            setup = Setup(
                work=work,
                keys=keys,
                bundles=bundles,
                mqtt_url=mqtt_url,
                settle_s=2.0 if args.quick else 5.0,
                within_s=120.0 if args.quick else 600.0,
            )
            runs, notes = asyncio.run(measure_all(sizes, setup))
        settings = {
            "sizes": list(sizes),
            "open_files_limit": files,
            "broker": "mosquitto" if setup.mqtt_url else "embedded",
            "database": "sqlite",
            "device_cert_validity": CERT_VALIDITY,
            "settle_s": setup.settle_s,
        }
    print(json.dumps(summary(runs, notes, settings)))


if __name__ == "__main__":
    main()
