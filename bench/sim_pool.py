"""A simulated fleet spread over worker processes, so that simulating it is never what limits
a fan-out measured against a control plane.

One ``SimFleet`` on one asyncio loop handles a few thousand devices, but at 10,000 its one
core would be busy decoding desired states and sending status reports while the control plane
waits: the benchmark would time the simulator. ``FleetPool`` runs ``workers`` processes (spawned,
never forked: gRPC's threads do not survive a fork), each with a SimFleet of its share of the
devices on its own loop, and drives them all over one pipe each:

    async with FleetPool(FleetSpec(target=..., ...), workers=4) as pool:
        await pool.enroll()            # every device enrolls (workers in parallel)
        await pool.connect()           # every device holds its stream
        await pool.arm()               # each device's goal: the generation after its current one
        started = time.monotonic()
        ...                            # Deploy
        seconds = await pool.wait("generation", within=600, since=started)

Times cross processes as ``time.monotonic()`` values: on Linux that is CLOCK_MONOTONIC, one
clock for every process of the machine. ``stats`` gives each worker's RSS and CPU seconds, so
a caller can show the workers were not saturated while it measured.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import multiprocessing
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from types import TracebackType
from typing import Any, Self

import psutil

from bench.sim_fleet import Progress, SimFleet

STOP_TIMEOUT_S = 30.0


class FleetWorkerError(RuntimeError):
    """A worker process failed a command (its error, as text) or went away."""


@dataclass(frozen=True)
class FleetSpec:
    """The whole fleet: ``size`` devices enrolling with ``token`` at ``target`` (TLS, checked
    against ``ca_pem``) and streaming on ``device_target``; ``enroll_concurrency`` per worker."""

    target: str
    device_target: str
    ca_pem: bytes
    token: str
    size: int
    enroll_concurrency: int = 32
    notices: bool = False  # devices hear of changes on the broker (bench.sim_notices), not a stream
    idle_seconds: float | None = 5.0  # with notices: an unused channel lets its connection go
    # after this (None: it keeps it until the control plane closes it for idleness)


@dataclass(frozen=True)
class WorkerStats:
    rss_mib: float
    cpu_s: float  # user + system seconds since the worker started


def split(size: int, workers: int) -> list[int]:
    """``size`` devices over ``workers`` processes, as even as can be, none empty."""
    workers = max(1, min(workers, size))
    base, extra = divmod(size, workers)
    return [base + (1 if i < extra else 0) for i in range(workers)]


def workers_for(size: int, per_worker: int) -> int:
    return max(1, math.ceil(size / per_worker))


class FleetPool:
    """``spec.size`` simulated devices over ``workers`` processes (see the module docstring)."""

    def __init__(self, spec: FleetSpec, workers: int) -> None:
        self.spec = spec
        self.shares = split(spec.size, workers)
        self._pipes: list[Connection] = []
        self._procs: list[multiprocessing.process.BaseProcess] = []

    async def __aenter__(self) -> Self:
        context = multiprocessing.get_context("spawn")
        try:
            for index, share in enumerate(self.shares):
                ours, theirs = context.Pipe()
                proc = context.Process(
                    target=_worker_main,
                    args=(theirs, self.spec, share, f"sim{index}"),
                    name=f"sim-fleet-{index}",
                    daemon=True,
                )
                proc.start()
                theirs.close()
                self._pipes.append(ours)
                self._procs.append(proc)
            await self._all("ready")
        except BaseException:
            await self.close()
            raise
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    @property
    def workers(self) -> int:
        return len(self.shares)

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self._procs if p.pid is not None]

    async def enroll(self) -> float:
        """Every device enrolls, the workers in parallel; returns the seconds that took."""
        started = time.monotonic()
        await self._all("enroll")
        return time.monotonic() - started

    async def connect(self) -> float:
        """Every device opens its stream; returns the seconds until every channel was ready."""
        started = time.monotonic()
        await self._all("connect")
        return time.monotonic() - started

    async def arm(self) -> None:
        """Sets every device's goal to the generation after the one it holds now."""
        await self._all("arm")

    async def wait(self, progress: Progress, within: float, since: float) -> float:
        """Seconds from ``since`` (time.monotonic()) until every device reached its armed goal
        (``progress``: received on its stream, or its outcome acknowledged)."""
        lasts = await self._all("wait", progress, within)
        return max(0.0, max(float(last) for last in lasts) - since)

    async def crossings(self, progress: Progress, since: float) -> list[float]:
        """Seconds from ``since`` at which each device reached its armed goal, sorted (after a
        ``wait`` for the same progress): the spread behind the last one."""
        times = [t for worker in await self._all("crossings", progress) for t in worker]
        return sorted(max(0.0, t - since) for t in times)

    async def stats(self) -> list[WorkerStats]:
        """Each worker's RSS and CPU time, read from outside (psutil) so no command waits."""
        out = []
        for pid in self.pids:
            proc = psutil.Process(pid)
            times = proc.cpu_times()
            out.append(WorkerStats(proc.memory_info().rss / 2**20, times.user + times.system))
        return out

    async def close(self) -> None:
        """Asks every worker to close its fleet and exit; kills one that does not in time."""
        for pipe in self._pipes:
            with contextlib.suppress(OSError):  # BrokenPipeError: that worker is gone already
                pipe.send(("close",))
        for proc in self._procs:
            await asyncio.to_thread(proc.join, STOP_TIMEOUT_S)
            if proc.is_alive():
                proc.kill()
                await asyncio.to_thread(proc.join, STOP_TIMEOUT_S)
        for pipe in self._pipes:
            pipe.close()
        self._pipes, self._procs = [], []

    async def _all(self, *command: Any) -> list[Any]:
        for pipe in self._pipes:
            pipe.send(command)
        return list(await asyncio.gather(*(self._reply(i) for i in range(len(self._pipes)))))

    async def _reply(self, index: int) -> Any:
        try:
            status, value = await asyncio.to_thread(self._pipes[index].recv)
        except EOFError:
            raise FleetWorkerError(f"fleet worker {index} exited") from None
        if status != "ok":
            raise FleetWorkerError(f"fleet worker {index}: {value}")
        return value


def _worker_main(pipe: Connection, spec: FleetSpec, share: int, prefix: str) -> None:
    """A worker process: one SimFleet of ``share`` devices, driven by commands on ``pipe``."""
    asyncio.run(_serve(pipe, spec, share, prefix))


class _Worker:
    """The worker's side: one SimFleet and the goals the last ``arm`` set."""

    def __init__(self, fleet: SimFleet) -> None:
        self.fleet = fleet
        self.goals: dict[str, int] = {}

    async def ready(self) -> None:
        return None

    async def enroll(self) -> float:
        await self.fleet.enroll()
        return self.fleet.enrolled_s

    async def connect(self) -> float:
        await self.fleet.connect()
        return self.fleet.connected_s

    async def arm(self) -> int:
        self.goals = {d.device_id: d.generation + 1 for d in self.fleet.devices}
        return len(self.goals)

    async def wait(self, progress: Progress, within: float) -> float:
        """The latest crossing as an absolute time.monotonic() value (since=0.0)."""
        waits = {"generation": self.fleet.wait_generation, "reported": self.fleet.wait_reported}
        return await waits[progress](self.goals, within, since=0.0)

    async def crossings(self, progress: Progress) -> list[float]:
        """When each device with a goal reached it (time.monotonic()), for those that did."""
        out = []
        for device in self.fleet.devices:
            goal = self.goals.get(device.device_id)
            if goal is None:
                continue
            held, at = (
                (device.generation, device.received_at)
                if progress == "generation"
                else (device.reported, device.reported_at)
            )
            if held >= goal:
                out.append(at)
        return out

    def handler(self, name: str) -> Callable[..., Awaitable[Any]]:
        table: dict[str, Callable[..., Awaitable[Any]]] = {
            "ready": self.ready,
            "enroll": self.enroll,
            "connect": self.connect,
            "arm": self.arm,
            "wait": self.wait,
            "crossings": self.crossings,
        }
        return table[name]


async def _serve(pipe: Connection, spec: FleetSpec, share: int, prefix: str) -> None:
    fleet = SimFleet(
        target=spec.target,
        device_target=spec.device_target,
        ca_pem=spec.ca_pem,
        token=spec.token,
        size=share,
        enroll_concurrency=spec.enroll_concurrency,
        hostname_prefix=prefix,
        notices=spec.notices,
        idle_seconds=spec.idle_seconds,
    )
    worker = _Worker(fleet)
    try:
        while True:
            try:
                command = await asyncio.to_thread(pipe.recv)
            except EOFError:
                return  # the parent went away
            name, args = command[0], command[1:]
            if name == "close":
                return
            try:
                value = await worker.handler(name)(*args)
            except Exception as exc:
                pipe.send(("error", f"{type(exc).__name__}: {exc}"))
            else:
                pipe.send(("ok", value))
    finally:
        await fleet.close()
        pipe.close()
