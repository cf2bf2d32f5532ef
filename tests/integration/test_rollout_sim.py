"""A simulated fleet for the rollout tests: devices that speak the real device protocol over the
control plane's real gRPC ports (enrolled with a CSR, mutual TLS, the desired-state stream,
ReportStatus at the generation they were nudged with) and whose inference summaries go into the
database the way ingestion stores them (edgefleet.controlplane.store.telemetry.insert_telemetry).

What a simulated device does with a new generation is the fleet's behaviour: report it ACTIVE
(after writing a summary of the release it now serves, at that release's tokens/s), or FAILED
for a release listed as failing, optionally after the fleet's ``hold`` is released. No model is
loaded: the rollout engine judges what devices say, which is what this controls.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
from google.protobuf import json_format
from google.protobuf.timestamp_pb2 import Timestamp
from sqlmodel import Session, col, select

from edgefleet.controlplane.app.server import RunningControlPlane, start_control_plane
from edgefleet.controlplane.app.settings import Settings
from edgefleet.controlplane.store.models import Bundle, Deployment, DeviceModel, RolloutDevice
from edgefleet.controlplane.store.telemetry import IngestRecord, insert_telemetry
from edgefleet.controlplane.trust.keys import KeyDir
from edgefleet.protos.fleet.v1 import common_pb2, device_pb2, operator_pb2, operator_pb2_grpc, telemetry_pb2
from tests.integration.conftest import EnrolledDevice, device_channel, enroll_device
from tests.integration.test_cp_models import push, tiny_bundle

Release = tuple[str, int]
ACTIVE = common_pb2.DEVICE_STATE_ACTIVE
FAILED = common_pb2.DEVICE_STATE_FAILED


def rollout_settings(work: Path, keys: KeyDir, mqtt_url: str, db_url: str | None = None) -> Settings:
    """A control plane whose rollout engine ticks five times a second."""
    return Settings(
        data_dir=work / "cp",
        listen="127.0.0.1:0",
        device_listen="127.0.0.1:0",
        mqtt_url=mqtt_url,
        keys_dir=keys.path,
        db_url=db_url,
        rollout_tick_seconds=0.2,
        desired_state_recheck_seconds=1.0,
    )


async def start(settings: Settings) -> RunningControlPlane:
    return await start_control_plane(settings)


def summary_payload(
    device_id: str, seq: int, release: Release, tokens_per_second: float, end: datetime, window: float
) -> dict[str, object]:
    """An InferenceSummary of 20 requests in the ``window`` seconds before ``end``, in the protobuf
    JSON mapping ingestion stores."""
    end_ts, start_ts = Timestamp(), Timestamp()
    end_ts.FromDatetime(end)
    start_ts.FromDatetime(end - timedelta(seconds=window))
    message = telemetry_pb2.InferenceSummary(
        schema_version=1,
        device_id=device_id,
        seq=seq,
        time=end_ts,
        window_start=start_ts,
        model=release[0],
        bundle=common_pb2.BundleRef(name=release[0], version=release[1]),
        variant="gguf-q4_0",
        requests=20,
        errors=0,
        latency_ms_p95=250.0,
        tokens_per_second=tokens_per_second,
        decode_tokens=int(tokens_per_second * 20),
        decode_seconds=20.0,
    )
    return json_format.MessageToDict(message)


@dataclass
class SimDevice:
    enrolled: EnrolledDevice
    serving: Release | None = None
    reports: list[tuple[int, int]] = field(default_factory=list)  # (generation, state)
    task: asyncio.Task[None] | None = None

    @property
    def id(self) -> str:
        return self.enrolled.id


@dataclass
class SimFleet:
    """Simulated devices of one control plane; ``speeds`` and ``failing`` say how each release
    behaves, ``hold`` (cleared) keeps devices from reporting until it is set."""

    controlplane: RunningControlPlane
    work: Path
    speeds: dict[Release, float] = field(default_factory=dict)
    failing: set[Release] = field(default_factory=set)
    apply_delay: float = 0.0
    devices: list[SimDevice] = field(default_factory=list)
    hold: asyncio.Event = field(default_factory=asyncio.Event)
    _seq: itertools.count[int] = field(default_factory=lambda: itertools.count(1))

    def __post_init__(self) -> None:
        self.hold.set()

    async def enroll(
        self,
        op: operator_pb2_grpc.OperatorServiceStub,
        public: grpc.aio.Channel,
        count: int,
        labels: dict[str, str],
    ) -> list[SimDevice]:
        token = (await op.CreateToken(operator_pb2.CreateTokenRequest(uses=count, labels=labels))).token
        added = []
        for _ in range(count):
            enrolled = await enroll_device(self.controlplane, public, token, self.work)
            device = SimDevice(enrolled)
            device.task = asyncio.create_task(self._watch(device))
            self.devices.append(device)
            added.append(device)
        return added

    def by_id(self, device_id: str) -> SimDevice:
        return next(d for d in self.devices if d.id == device_id)

    def write_summaries(
        self,
        device: SimDevice,
        release: Release,
        tokens_per_second: float,
        ends: Iterable[datetime],
        window: float = 30.0,
    ) -> None:
        records = [
            IngestRecord(
                device_id=device.id,
                kind="inference",
                seq=seq,
                time=end,
                payload=summary_payload(device.id, seq, release, tokens_per_second, end, window),
            )
            for end, seq in zip(ends, self._seq, strict=False)
        ]
        insert_telemetry(self.controlplane.engine, records=records)

    def baseline(self, release: Release, minutes_ago: Iterable[int] = (30, 20, 10)) -> None:
        """Summaries of ``release`` on every device over the last half hour: what gates compare with."""
        now = datetime.now(UTC)
        for device in self.devices:
            self.write_summaries(
                device, release, self.speeds[release], [now - timedelta(minutes=m) for m in minutes_ago]
            )

    async def _watch(self, device: SimDevice) -> None:
        with contextlib.suppress(grpc.aio.AioRpcError, asyncio.CancelledError):
            stream = device.enrolled.stub.WatchDesiredState(device_pb2.WatchDesiredStateRequest())
            async for desired in stream:
                await self._apply(device, desired)

    async def _apply(self, device: SimDevice, desired: device_pb2.DesiredState) -> None:
        await self.hold.wait()
        if self.apply_delay:
            await asyncio.sleep(self.apply_delay)
        release = (desired.bundle.name, desired.bundle.version) if desired.HasField("bundle") else None
        report = device_pb2.StatusReport(generation=desired.generation, api_url="http://127.0.0.1:1")
        if release is not None and release in self.failing:
            report.state = FAILED
            report.error = f"smoke test failed: {release[0]}@{release[1]} does not load"
            report.error_kind = "SmokeTestFailed"
        else:
            device.serving = release
            report.state = ACTIVE
        if device.serving is not None:
            report.active_bundle.CopyFrom(
                common_pb2.BundleRef(name=device.serving[0], version=device.serving[1])
            )
        await device.enrolled.stub.ReportStatus(report)
        if report.state == ACTIVE and release is not None and release in self.speeds:
            # The first interval served after applying (it ends half a second from now).
            end = datetime.now(UTC) + timedelta(seconds=0.5)
            await asyncio.to_thread(self.write_summaries, device, release, self.speeds[release], [end], 0.5)
        device.reports.append((desired.generation, report.state))

    async def reconnect(self, controlplane: RunningControlPlane) -> None:
        """After a control-plane restart: new channels to its new device port, same identities."""
        self.controlplane = controlplane
        for device in self.devices:
            if device.task is not None:
                device.task.cancel()
            await device.enrolled.channel.close()
            device.enrolled.channel = device_channel(controlplane, device.enrolled.certificate)
            device.task = asyncio.create_task(self._watch(device))

    async def close(self) -> None:
        for device in self.devices:
            if device.task is not None:
                device.task.cancel()
            with contextlib.suppress(Exception):
                await device.enrolled.channel.close()


async def push_release(
    op: operator_pb2_grpc.OperatorServiceStub, keys: KeyDir, work: Path, token: str, name: str, version: int
) -> common_pb2.BundleRef:
    bundle = tiny_bundle(work, keys, name, version)
    return await push(op, bundle.path, keys.release_signers(), token)


async def eventually(check: Callable[[], object], within: float = 30.0, every: float = 0.1) -> None:
    """Waits until ``check()`` (sync or async) is truthy."""
    deadline = asyncio.get_running_loop().time() + within
    while True:
        result = check()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"condition not met within {within}s")
        await asyncio.sleep(every)


async def rollout(op: operator_pb2_grpc.OperatorServiceStub, name: str) -> operator_pb2.Rollout:
    return await op.GetRollout(operator_pb2.GetRolloutRequest(name=name))


async def wait_state(
    op: operator_pb2_grpc.OperatorServiceStub, name: str, state: int, within: float = 60.0
) -> operator_pb2.Rollout:
    found: list[operator_pb2.Rollout] = []

    async def reached() -> bool:
        found[:] = [await rollout(op, name)]
        return found[0].state == state

    try:
        await eventually(reached, within=within)
    except AssertionError as exc:
        raise AssertionError(
            f"rollout {name} never reached state {state}: {found[-1] if found else None}"
        ) from exc
    return found[0]


def deployments(controlplane: RunningControlPlane) -> dict[str, list[tuple[str, int, int]]]:
    """Every device's Deployment rows: (bundle name, version, generation), in generation order."""
    with Session(controlplane.engine) as s:
        rows = s.exec(
            select(Deployment.device_id, Bundle.name, Bundle.version, Deployment.generation)
            .join(Bundle, col(Bundle.id) == col(Deployment.bundle_id))
            .order_by(col(Deployment.device_id), col(Deployment.generation))
        ).all()
    result: dict[str, list[tuple[str, int, int]]] = {}
    for device_id, name, version, generation in rows:
        result.setdefault(device_id, []).append((name, version, generation))
    return result


def models_of(controlplane: RunningControlPlane, device_id: str) -> dict[str, int]:
    """The releases a device is assigned now: {bundle name: version}."""
    with Session(controlplane.engine) as s:
        rows = s.exec(
            select(Bundle.name, Bundle.version)
            .join(DeviceModel, col(DeviceModel.bundle_id) == col(Bundle.id))
            .where(DeviceModel.device_id == device_id)
        ).all()
    return dict(rows)


def rollout_rows(controlplane: RunningControlPlane) -> list[RolloutDevice]:
    with Session(controlplane.engine) as s:
        return list(s.exec(select(RolloutDevice)).all())
