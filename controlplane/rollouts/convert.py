"""Rollouts between the wire (fleet.v1 CreateRolloutRequest, Rollout) and the database: a
request checked into a RolloutSpec, and a stored rollout described as a Rollout message."""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from google.protobuf.timestamp_pb2 import Timestamp

from edgefleet.controlplane.rollouts import states
from edgefleet.controlplane.rollouts.engine import progress_of, soak_until, wave_sizes
from edgefleet.controlplane.rollouts.gates import InvalidGates, Thresholds
from edgefleet.controlplane.rollouts.waves import InvalidWaves, WaveSize, check_waves
from edgefleet.controlplane.store.errors import StoreError
from edgefleet.controlplane.store.models import Bundle, Rollout, RolloutDevice
from edgefleet.controlplane.store.values import as_utc
from edgefleet.protos.fleet import selectors
from edgefleet.protos.fleet.device_config import (
    InvalidConfig,
    config_from_json,
    config_to_json,
    validate_config,
)
from edgefleet.protos.fleet.v1 import common_pb2, operator_pb2

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
MAX_SOAK_SECONDS = 30 * 86400


class InvalidRollout(StoreError):
    """A rollout request that cannot be carried out as given; the message says why."""


@dataclass(frozen=True, slots=True)
class RolloutSpec:
    """A checked CreateRolloutRequest."""

    name: str
    bundle: common_pb2.BundleRef | None
    config: dict[str, Any] | None  # stored form; None for a release rollout
    selector: dict[str, str]
    waves: list[WaveSize]
    soak_seconds: int
    max_concurrent: int
    thresholds: Thresholds


def spec(request: operator_pb2.CreateRolloutRequest) -> RolloutSpec:
    """Checks a request; raises InvalidRollout naming the first problem."""
    if not NAME.match(request.name):
        raise InvalidRollout(
            f"rollout name {request.name!r} must be 1-128 letters, digits, '.', '_' or '-', starting "
            "with a letter or digit"
        )
    which = request.WhichOneof("change")
    if which is None:
        raise InvalidRollout("give the change: a bundle (NAME@VERSION) or a device config")
    config = None
    if which == "config":
        try:
            validate_config(request.config)
        except InvalidConfig as exc:
            raise InvalidRollout(f"device config refused: {exc}") from exc
        config = config_to_json(request.config)
    elif not request.bundle.name or request.bundle.version <= 0:
        raise InvalidRollout("the bundle needs a name and a version above 0")
    sizes = []
    for wave in request.waves:
        kind = wave.WhichOneof("size")
        if kind is None:
            raise InvalidRollout("every wave needs a percent or a count")
        sizes.append(WaveSize(percent=wave.percent) if kind == "percent" else WaveSize(count=wave.count))
    thresholds = Thresholds(
        max_load_failure_rate=request.gates.max_load_failure_rate,
        max_error_rate=request.gates.max_error_rate,
        max_p95_latency_ratio=request.gates.max_p95_latency_ratio,
        min_tokens_per_second_ratio=request.gates.min_tokens_per_second_ratio,
        min_requests=request.gates.min_requests,
    )
    try:
        selectors.check_selector(request.selector)
        check_waves(sizes)
        thresholds.check()
    except (selectors.InvalidLabels, InvalidWaves, InvalidGates) as exc:
        raise InvalidRollout(str(exc)) from exc
    if request.soak_seconds > MAX_SOAK_SECONDS:
        raise InvalidRollout(f"soak_seconds is at most {MAX_SOAK_SECONDS} (30 days)")
    return RolloutSpec(
        name=request.name,
        bundle=request.bundle if which == "bundle" else None,
        config=config,
        selector=dict(request.selector),
        waves=sizes,
        soak_seconds=request.soak_seconds,
        max_concurrent=request.max_concurrent,
        thresholds=thresholds,
    )


def _timestamp(value: datetime | None) -> Timestamp:
    stamp = Timestamp()
    if value is not None:
        stamp.FromDatetime(as_utc(value))
    return stamp


def _wave_message(size: WaveSize) -> operator_pb2.WaveSpec:
    if size.percent is not None:
        return operator_pb2.WaveSpec(percent=size.percent)
    return operator_pb2.WaveSpec(count=size.count or 0)


def _bundle_ref(bundle: Bundle | None) -> common_pb2.BundleRef | None:
    return None if bundle is None else common_pb2.BundleRef(name=bundle.name, version=bundle.version)


def message(
    rollout: Rollout,
    *,
    bundles: Mapping[int, Bundle],
    counts: Counter[tuple[int, int]],
    devices: Sequence[RolloutDevice] = (),
) -> operator_pb2.Rollout:
    """The rollout as fleet.v1.Rollout. ``bundles`` has the rollout's bundle and the devices'
    previous ones; ``counts`` how many devices each (wave, device state) has."""
    thresholds = Thresholds.from_json(rollout.gates)
    result = operator_pb2.Rollout(
        id=rollout.id or 0,
        name=rollout.name,
        state=rollout.state,  # type: ignore[arg-type]
        selector=rollout.selector,
        waves=[_wave_message(w) for w in (WaveSize.from_json(w) for w in rollout.waves)],
        soak_seconds=rollout.soak_seconds,
        max_concurrent=rollout.max_concurrent,
        gates=operator_pb2.HealthGates(**thresholds.as_json()),
        current_wave=rollout.current_wave,
        reason=rollout.reason,
        created=_timestamp(rollout.created_at),
        updated=_timestamp(rollout.updated_at),
        created_by=rollout.created_by,
    )
    bundle = _bundle_ref(bundles.get(rollout.bundle_id)) if rollout.bundle_id is not None else None
    if bundle is not None:
        result.bundle.CopyFrom(bundle)
    else:
        result.config.CopyFrom(config_from_json(rollout.config or {}))
        result.config.SetInParent()
    for index in range(len(wave_sizes(rollout))):
        in_wave = Counter({state: n for (wave, state), n in counts.items() if wave == index})
        status = operator_pb2.WaveStatus(
            index=index,
            devices=sum(in_wave.values()),
            updated=in_wave[states.UPDATED] + in_wave[states.HEALTHY],
            healthy=in_wave[states.HEALTHY],
            failed=in_wave[states.FAILED],
            gate_result=str(progress_of(rollout, index)["gate_result"]),
        )
        until = soak_until(rollout, index)
        if until is not None:
            status.soak_until.CopyFrom(_timestamp(until))
        result.wave_status.append(status)
    for row in devices:
        entry = operator_pb2.RolloutDevice(
            device_id=row.device_id,
            wave=row.wave,
            state=row.state,  # type: ignore[arg-type]
            reason=row.reason,
            generation=row.generation,
        )
        previous = _bundle_ref(bundles.get(row.previous_bundle_id)) if row.previous_bundle_id else None
        if previous is not None:
            entry.previous_bundle.CopyFrom(previous)
        result.devices.append(entry)
    return result
