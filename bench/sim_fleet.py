"""A simulated fleet: N devices in one process, on one asyncio loop, speaking the real device
gRPC protocol to a real control plane.

Each simulated device does what the agent does on the wire (agent/service.py): it makes one
P-256 key, enrolls over TLS with the bootstrap token and a CSR (edgefleet.agent.device.tls), opens its
own mutual-TLS channel with the certificate it got, holds ``WatchDesiredState`` open (and
reopens it with jittered backoff) — or, with ``notices=True``, listens for desired-state
notices on an MQTT connection of its own (bench.sim_notices) while its channel lets its
connection go when unused, as the agent does with ``--desired-via broker`` — and answers
every nudge with ``ReportStatus``: VERIFYING,
then, after its behaviour's delay, ACTIVE at that generation with the nudge's release among
its models, or FAILED with an error and error kind (a release that fails to load; the previous
one keeps "serving", as with the agent). It can publish InferenceSummary telemetry on its
inference topic with the tokens/s and latency a caller gives for the release it runs.

What a simulated device does NOT do: hold a model, verify TUF metadata, download artifacts.
It trusts the nudge's bundle hint (so an undeploy, whose nudge names no bundle, leaves its
models as they were). It exercises the control plane's fan-out, state tracking and rollout
gates at fleet sizes no machine could run real agents for; it says nothing about the agent,
which tests/e2e covers with real processes.

Why it stays small per device: one gRPC channel each is unavoidable (every device presents
its own client certificate, so no two can share a connection, and each gets its own
subchannel), plus one task holding the stream and a few fields; the key is dropped once the
channel's credentials hold it. Telemetry goes through ONE MQTT connection publishing for
every device: the tests' Mosquitto allows anonymous clients and has no ACL. A broker that
checks device certificates (deploy/mosquitto/) would refuse it; that path is the agent's.

    async with SimFleet(target=..., ca_pem=..., token=..., size=50) as fleet:
        deployed = await operator.Deploy(...)
        seconds = await fleet.wait_generation(deployed.max_generation, within=30)

This module holds the fleet and its gRPC conversation; a device's data and behaviour are in
bench.sim_device, its telemetry in bench.sim_telemetry, the release it is sent in
bench.sim_bundle (the names callers use are re-exported here).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import timedelta
from types import TracebackType
from typing import Literal, Self

import grpc

from bench.sim_bundle import build_sim_bundle, write_tiny_gguf
from bench.sim_device import ANY_RELEASE, VARIANT, Behaviour, SimDevice, backoff, release_name
from bench.sim_notices import NoticeListeners
from bench.sim_telemetry import TelemetryLink, inference_summary
from edgefleet.agent.device.channel import CHANNEL_OPTIONS, channel_options, open_enrollment_channel
from edgefleet.agent.device.identity import DeviceIdentity
from edgefleet.agent.device.tls import csr_pem, key_pem, new_key
from edgefleet.agent.telemetry.outbox import encode_batch, encode_message
from edgefleet.protos.fleet.topics import TopicKind, telemetry_topic
from edgefleet.protos.fleet.v1 import common_pb2, device_pb2, device_pb2_grpc

REPORT_TIMEOUT_S = 30.0
REPORTS_IN_FLIGHT = 128
ENROLL_TIMEOUT_S = 60.0
ENROLL_ATTEMPTS = 3
DEVICE_CHANNEL_OPTIONS = [*CHANNEL_OPTIONS, ("grpc.use_local_subchannel_pool", 1)]
"""The agent's options (retries, keepalive), and a connection of each channel's own: channels
with different client certificates must never be pooled into one."""


def idle_options(idle_seconds: float | None) -> list[tuple[str, str | int]]:
    """The agent's options with ``--desired-via broker`` (edgefleet.agent.device.channel), and
    a connection of each channel's own. ``idle_seconds`` None: the channel keeps its connection
    until the control plane closes it for idleness (``--max-connection-idle-seconds``)."""
    if idle_seconds is None:
        options = [(k, v) for k, v in DEVICE_CHANNEL_OPTIONS if k != "grpc.keepalive_permit_without_calls"]
        return [*options, ("grpc.keepalive_permit_without_calls", 0)]
    options = channel_options("127.0.0.1:1", idle_seconds=idle_seconds)
    return [*options, ("grpc.use_local_subchannel_pool", 1)]


Labels = Mapping[str, str] | Callable[[int], Mapping[str, str]]
"""Enrollment labels: the same for every device, or per device index (e.g. canary rings)."""


Progress = Literal["generation", "reported"]


@dataclass(slots=True, eq=False)
class _Waiter:
    """Someone waiting for devices to reach generations; counted down as devices cross, so a
    fan-out to thousands costs O(1) per delivery instead of a scan of the fleet."""

    progress: Progress
    targets: dict[str, int]
    remaining: int
    done: asyncio.Future[None]
    last: float = 0.0  # when the latest device crossed (monotonic)


class SimFleet:
    """``size`` simulated devices enrolled with ``token`` at ``target`` (the control plane's TLS
    port, verified against ``ca_pem``), each holding its desired-state stream on
    ``device_target`` (default: the endpoint the control plane names at enrollment).

    Entering enrolls them ``enroll_concurrency`` at a time, opens every channel and starts every
    stream; it returns once every channel is connected. ``enrolled_s`` and ``connected_s`` say
    how long those took. ``mqtt_url`` is the broker telemetry goes to (default: the one the
    control plane names at enrollment), connected on the first ``publish_inference``.
    """

    def __init__(
        self,
        *,
        target: str,
        ca_pem: bytes,
        token: str,
        size: int,
        device_target: str | None = None,
        labels: Labels | None = None,
        behaviour: Behaviour = Behaviour(),
        enroll_concurrency: int = 32,
        connect_timeout: float = 120.0,
        mqtt_url: str | None = None,
        hostname_prefix: str = "sim",
        notices: bool = False,
        idle_seconds: float | None = 5.0,
    ) -> None:
        self.target = target
        self.ca_pem = ca_pem
        self.token = token
        self.size = size
        self.device_target = device_target
        self.labels = labels
        self.default_behaviour = behaviour
        self.enroll_concurrency = enroll_concurrency
        self.connect_timeout = connect_timeout
        self.mqtt_url = mqtt_url
        self.hostname_prefix = hostname_prefix
        # With notices, devices hear of changes on their own MQTT connection (bench.sim_notices)
        # and their gRPC channels let the connection go after ``idle_seconds`` unused.
        self.notices = notices
        self.idle_seconds = idle_seconds
        self._listeners: NoticeListeners | None = None
        self.enrolled_s = 0.0
        self.connected_s = 0.0
        self._devices: dict[str, SimDevice] = {}
        self._waiters: list[_Waiter] = []
        self._enroll_channel: grpc.aio.Channel | None = None
        self._telemetry: TelemetryLink | None = None
        self._telemetry_lock = asyncio.Lock()
        # Reports in flight from this process at once. Thousands of first connections and
        # calls at once (devices that were idle, all told of a deploy) grew a worker's gRPC
        # memory by gigabytes until the kernel killed it; the control plane writes a few
        # hundred reports a second, so this many in flight per process still keep it busy.
        self._report_slots = asyncio.Semaphore(REPORTS_IN_FLIGHT)

    # -- lifecycle -----------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        try:
            await self._start()
        except BaseException:
            await self.close()
            raise
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def _start(self) -> None:
        await self.enroll()
        await self.connect()

    async def enroll(self) -> None:
        """Enrolls every device (``enrolled_s``); no device channel is connected yet. What
        entering does first; called alone, it lets a caller look at the control plane between
        enrollment and the streams (bench.fanout measures its memory there)."""
        started = time.monotonic()
        self._enroll_channel = open_enrollment_channel(self.target, self.ca_pem)
        stub = device_pb2_grpc.DeviceServiceStub(self._enroll_channel)
        slots = asyncio.Semaphore(self.enroll_concurrency)
        async with asyncio.TaskGroup() as group:
            tasks = [group.create_task(self._enroll(stub, slots, index)) for index in range(self.size)]
        for task in tasks:
            device = task.result()
            self._devices[device.device_id] = device
        self.enrolled_s = time.monotonic() - started
        # Enrollment is over: its connection would otherwise stay open, and count, for the run.
        await self._enroll_channel.close()
        self._enroll_channel = None

    async def connect(self) -> None:
        """Starts every enrolled device's stream and returns once every channel is connected
        (``connected_s``)."""
        started = time.monotonic()
        if self.notices:
            await self._listen()
            self.connected_s = time.monotonic() - started
            return
        for device in self._devices.values():
            if device.watch is None:
                device.watch = asyncio.create_task(self._watch(device), name=f"watch-{device.device_id}")
        await asyncio.wait_for(
            asyncio.gather(*(d.channel.channel_ready() for d in self._devices.values())),
            self.connect_timeout,
        )
        self.connected_s = time.monotonic() - started

    async def _listen(self) -> None:
        if not self.mqtt_url:
            raise RuntimeError("no broker URL for notices: pass mqtt_url, or enroll first")
        if self._listeners is None:
            self._listeners = NoticeListeners(self.mqtt_url, self._noticed)
        await self._listeners.connect(self._devices, self.connect_timeout)

    def _noticed(self, device_id: str, desired: device_pb2.DesiredState) -> None:
        device = self._devices.get(device_id)
        if device is not None:
            self._nudged(device, desired)

    async def close(self) -> None:
        """Ends every stream and closes every channel and the broker connection."""
        if self._listeners is not None:
            await self._listeners.close()
            self._listeners = None
        tasks = [t for d in self._devices.values() for t in (d.watch, d.applying) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.gather(*(d.channel.close() for d in self._devices.values()), return_exceptions=True)
        if self._enroll_channel is not None:
            await self._enroll_channel.close()
            self._enroll_channel = None
        for waiter in self._waiters:
            if not waiter.done.done():
                waiter.done.cancel()
        if self._telemetry is not None:
            await asyncio.to_thread(self._telemetry.close)
            self._telemetry = None

    def _labels_of(self, index: int) -> Mapping[str, str]:
        if self.labels is None:
            return {}
        return self.labels(index) if callable(self.labels) else self.labels

    async def _enroll(
        self, stub: device_pb2_grpc.DeviceServiceStub, slots: asyncio.Semaphore, index: int
    ) -> SimDevice:
        """Enrolls like the agent; retrying is safe because the control plane recognises the
        same token and key and answers with the same identity without spending a use."""
        hostname = f"{self.hostname_prefix}-{index:05d}"
        key = new_key()
        request = device_pb2.EnrollRequest(
            bootstrap_token=self.token,
            hostname=hostname,
            labels=dict(self._labels_of(index)),
            csr=csr_pem(key, hostname),
        )
        async with slots:
            for attempt in range(ENROLL_ATTEMPTS):
                try:
                    response = await stub.Enroll(request, timeout=ENROLL_TIMEOUT_S)
                    break
                except grpc.aio.AioRpcError as exc:
                    transient = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
                    if exc.code() not in transient or attempt == ENROLL_ATTEMPTS - 1:
                        raise
                    await asyncio.sleep(backoff(attempt))
        if self.mqtt_url is None:
            self.mqtt_url = response.mqtt_url
        identity = DeviceIdentity(
            device_id=response.device_id,
            mqtt_url=response.mqtt_url,
            controlplane=self.target,
            device_endpoint=response.device_endpoint,
        )
        credentials = grpc.ssl_channel_credentials(
            root_certificates=self.ca_pem, private_key=key_pem(key), certificate_chain=response.certificate
        )
        options = idle_options(self.idle_seconds) if self.notices else DEVICE_CHANNEL_OPTIONS
        channel = grpc.aio.secure_channel(
            self.device_target or identity.device_target, credentials, options=options
        )
        return SimDevice(
            device_id=response.device_id,
            index=index,
            channel=channel,
            stub=device_pb2_grpc.DeviceServiceStub(channel),
            behaviour=self.default_behaviour,
        )

    # -- the device side -------------------------------------------------------------------

    async def _watch(self, device: SimDevice) -> None:
        """Holds the stream; reopens it with backoff; stops for good when the device is revoked."""
        failures = 0
        while True:
            request = device_pb2.WatchDesiredStateRequest(known_generation=device.reported)
            try:
                async for desired in device.stub.WatchDesiredState(request):
                    failures = 0
                    self._nudged(device, desired)
            except grpc.aio.AioRpcError as exc:
                if exc.code() == grpc.StatusCode.UNAUTHENTICATED:
                    device.revoked = True
                    return
            failures += 1
            await asyncio.sleep(backoff(failures))

    def _nudged(self, device: SimDevice, desired: device_pb2.DesiredState) -> None:
        if desired.generation <= device.generation:
            return
        before, device.generation = device.generation, desired.generation
        device.received_at = time.monotonic()
        self._advance(device, "generation", before, device.generation, device.received_at)
        if device.applying is not None:
            device.applying.cancel()  # the newest desired state wins, as with the agent
        device.applying = asyncio.create_task(self._apply(device, desired))

    async def _apply(self, device: SimDevice, desired: device_pb2.DesiredState) -> None:
        generation = desired.generation
        bundle = desired.bundle if desired.HasField("bundle") else None
        release = release_name(bundle.name, bundle.version) if bundle is not None else None
        await self._report(device, common_pb2.DEVICE_STATE_VERIFYING, generation, detail="verifying")
        behaviour = device.behaviour
        if behaviour.delay_s > 0:
            await asyncio.sleep(behaviour.delay_s)
        if behaviour.fails(release):
            device.last_error = f"{release}: {behaviour.error}"
            await self._report(
                device,
                common_pb2.DEVICE_STATE_FAILED,
                generation,
                detail="release refused",
                error_kind=behaviour.error_kind,
            )
        else:
            if bundle is not None and release is not None:
                device.models[bundle.name] = bundle.version
                device.active = release
            device.last_error = ""
            await self._report(device, common_pb2.DEVICE_STATE_ACTIVE, generation, detail="serving")
        before, device.reported = device.reported, max(device.reported, generation)
        device.reported_at = time.monotonic()
        self._advance(device, "reported", before, device.reported, device.reported_at)

    async def _report(
        self, device: SimDevice, state: int, generation: int, *, detail: str, error_kind: str = ""
    ) -> None:
        """Sends one status report until it is acknowledged (latest wins: a newer nudge cancels
        this task); a revoked device stops reporting."""
        device.state = state
        report = device_pb2.StatusReport(
            state=state,  # type: ignore[arg-type]
            generation=generation,
            api_url=device.api_url,
            error=device.last_error if state == common_pb2.DEVICE_STATE_FAILED else "",
            error_kind=error_kind,
            variant=VARIANT if device.active else "",
            detail=detail,
            models=device.installed(),
        )
        if device.active is not None:
            name, _, version = device.active.rpartition("@")
            report.active_bundle.CopyFrom(common_pb2.BundleRef(name=name, version=int(version)))
        failures = 0
        while True:
            try:
                async with self._report_slots:
                    await device.stub.ReportStatus(report, timeout=REPORT_TIMEOUT_S)
                return
            except grpc.aio.AioRpcError as exc:
                if exc.code() == grpc.StatusCode.UNAUTHENTICATED:
                    device.revoked = True
                    return
                failures += 1
                await asyncio.sleep(backoff(failures))

    # -- waiting ---------------------------------------------------------------------------

    def _advance(self, device: SimDevice, progress: Progress, before: int, now: int, at: float) -> None:
        for waiter in self._waiters:
            if waiter.progress != progress:
                continue
            goal = waiter.targets.get(device.device_id)
            if goal is not None and before < goal <= now:
                waiter.remaining -= 1
                waiter.last = max(waiter.last, at)
                if waiter.remaining == 0 and not waiter.done.done():
                    waiter.done.set_result(None)

    async def _wait(
        self, progress: Progress, generation: int | Mapping[str, int], within: float, since: float | None
    ) -> float:
        since = time.monotonic() if since is None else since
        if isinstance(generation, int):
            targets = dict.fromkeys(self._devices, generation)
        else:
            unknown = generation.keys() - self._devices.keys()
            if unknown:
                raise KeyError(f"not simulated devices: {', '.join(sorted(unknown))}")
            targets = dict(generation)
        waiter = _Waiter(progress, targets, 0, asyncio.get_running_loop().create_future())
        for device_id, goal in targets.items():
            device = self._devices[device_id]
            held, at = (
                (device.generation, device.received_at)
                if progress == "generation"
                else (device.reported, device.reported_at)
            )
            if held < goal:
                waiter.remaining += 1
            else:
                waiter.last = max(waiter.last, at)
        if waiter.remaining:
            self._waiters.append(waiter)
            try:
                await asyncio.wait_for(waiter.done, within)
            except TimeoutError:
                raise TimeoutError(
                    f"{waiter.remaining} of {len(targets)} devices had not {progress} their target "
                    f"generation after {within:.0f}s"
                ) from None
            finally:
                self._waiters.remove(waiter)
        return max(0.0, waiter.last - since)

    async def wait_generation(
        self, generation: int | Mapping[str, int], within: float, *, since: float | None = None
    ) -> float:
        """Seconds from ``since`` (a time.monotonic() value; default: now) until every device
        (or each device of a mapping) had received at least ``generation`` on its stream;
        0.0 if they already had. Raises TimeoutError naming how many are behind."""
        return await self._wait("generation", generation, within, since)

    async def wait_reported(
        self, generation: int | Mapping[str, int], within: float, *, since: float | None = None
    ) -> float:
        """Like ``wait_generation``, until the control plane acknowledged every device's outcome
        (ACTIVE or FAILED) for at least ``generation``: what it shows in ListDevices is settled."""
        return await self._wait("reported", generation, within, since)

    # -- the caller's controls ---------------------------------------------------------------

    @property
    def devices(self) -> list[SimDevice]:
        """Every simulated device, in enrollment order."""
        return list(self._devices.values())

    def device(self, device_id: str) -> SimDevice:
        return self._devices[device_id]

    def set_behaviour(self, device_id: str, behaviour: Behaviour) -> None:
        """How ``device_id`` answers its next nudges (one being applied keeps its behaviour)."""
        self._devices[device_id].behaviour = behaviour

    async def publish_inference(
        self,
        *,
        tokens_per_second: float,
        latency_ms: float,
        requests: int = 10,
        errors: int = 0,
        device_ids: Iterable[str] | None = None,
        release: str | None = None,
        window: timedelta = timedelta(seconds=60),
        within: float = 30.0,
    ) -> int:
        """Publishes one InferenceSummary per device (default: all) for the release it runs,
        as its agent would at the end of an interval, and returns how many, once the broker
        acknowledged them all. With ``release`` (``name@version``), only devices serving that
        release publish, for it: call once per release to give releases different figures.
        Devices serving nothing publish nothing."""
        chosen = self.devices if device_ids is None else [self._devices[i] for i in device_ids]
        messages = []
        for device in chosen:
            served = release if release is not None else device.active
            if served is None:
                continue
            name, _, version = served.rpartition("@")
            if device.models.get(name) != int(version):
                continue
            summary = inference_summary(
                device,
                name,
                int(version),
                tokens_per_second=tokens_per_second,
                latency_ms=latency_ms,
                requests=requests,
                errors=errors,
                window=window,
            )
            topic = telemetry_topic(device.device_id, TopicKind.INFERENCE)
            messages.append((topic, encode_batch([encode_message(summary)])))
        link = await self._telemetry_link(within)
        await asyncio.to_thread(link.publish_all, messages, within)
        return len(messages)

    async def _telemetry_link(self, within: float) -> TelemetryLink:
        async with self._telemetry_lock:
            if self._telemetry is None:
                if not self.mqtt_url:
                    raise RuntimeError("no broker URL: pass mqtt_url, or enroll first")
                link = TelemetryLink(self.mqtt_url)
                await asyncio.to_thread(link.open, within)
                self._telemetry = link
            return self._telemetry


__all__ = [
    "ANY_RELEASE",
    "VARIANT",
    "Behaviour",
    "SimDevice",
    "SimFleet",
    "build_sim_bundle",
    "release_name",
    "write_tiny_gguf",
]
