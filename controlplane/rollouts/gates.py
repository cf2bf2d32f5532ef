"""Health gates: whether a wave's devices are doing well enough on the change for the rollout to
go on. Pure arithmetic over figures the engine gathers (controlplane/rollouts/evidence.py).

Two moments, two kinds of gate:

- load: as soon as the wave's outcome is certain — every device applied the change or failed to
  load it, or the failures already exceed the rate whatever the rest do — the share of devices
  that failed is compared with ``max_load_failure_rate``;
- health: after the soak, from the inference summaries the devices reported. Per device, the
  new release's figures since it was updated are compared with the previous release's on the
  same device just before: a fleet is too varied (hardware, load, prompts) for absolute numbers,
  a device against itself is not. Error rate = errors / requests on the new release; p95
  latency = the request-weighted mean of the intervals' p95, new over old; decode tokens/s =
  sum of decode tokens / sum of decode seconds, new over old. A ratio of the wave is the
  mean of its devices' ratios, weighted by the requests each served on the new release.

The error rate pools every device's requests and is judged once the wave served
``min_requests`` (at least one) on the change. A device counts in the ratios once it served
``min_requests`` on the new release and as many before (its baseline); devices left out are
named in the result, so an operator sees when a gate passed on few devices. A threshold of 0
turns its gate off, as HealthGates says.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

MAX_NAMED = 5  # devices named in a result before "and N more"


class InvalidGates(ValueError):
    """Thresholds that cannot be met or make no sense."""


@dataclass(frozen=True, slots=True)
class Thresholds:
    """A rollout's HealthGates; 0 turns a gate off."""

    max_load_failure_rate: float = 0.0
    max_error_rate: float = 0.0
    max_p95_latency_ratio: float = 0.0
    min_tokens_per_second_ratio: float = 0.0
    min_requests: int = 0

    def check(self) -> None:
        for name in ("max_load_failure_rate", "max_error_rate"):
            value = getattr(self, name)
            if not 0 <= value <= 1:
                raise InvalidGates(f"{name} is a fraction between 0 and 1 (0.1 is 10%), not {value:g}")
        for name in ("max_p95_latency_ratio", "min_tokens_per_second_ratio"):
            if getattr(self, name) < 0:
                raise InvalidGates(f"{name} cannot be negative")
        if self.min_requests < 0:
            raise InvalidGates("min_requests cannot be negative")

    def as_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Thresholds:
        return cls(
            max_load_failure_rate=float(data.get("max_load_failure_rate", 0.0)),
            max_error_rate=float(data.get("max_error_rate", 0.0)),
            max_p95_latency_ratio=float(data.get("max_p95_latency_ratio", 0.0)),
            min_tokens_per_second_ratio=float(data.get("min_tokens_per_second_ratio", 0.0)),
            min_requests=int(data.get("min_requests", 0)),
        )

    @property
    def enough_requests(self) -> int:
        return max(self.min_requests, 1)


@dataclass(frozen=True, slots=True)
class Interval:
    """What one InferenceSummary says: one model on one device over one interval."""

    requests: int = 0
    errors: int = 0
    latency_ms_p95: float = 0.0
    decode_tokens: int = 0
    decode_seconds: float = 0.0


@dataclass(frozen=True, slots=True)
class Figures:
    """Intervals added up, so that rates and weighted means come out exact."""

    requests: int = 0
    errors: int = 0
    latency_weight: float = 0.0  # sum of requests x p95
    decode_tokens: int = 0
    decode_seconds: float = 0.0

    @classmethod
    def of(cls, intervals: Iterable[Interval]) -> Figures:
        items = list(intervals)
        return cls(
            requests=sum(i.requests for i in items),
            errors=sum(i.errors for i in items),
            latency_weight=sum(i.requests * i.latency_ms_p95 for i in items),
            decode_tokens=sum(i.decode_tokens for i in items),
            decode_seconds=sum(i.decode_seconds for i in items),
        )

    @property
    def p95(self) -> float | None:
        return self.latency_weight / self.requests if self.requests else None

    @property
    def tokens_per_second(self) -> float | None:
        return self.decode_tokens / self.decode_seconds if self.decode_seconds > 0 else None


@dataclass(frozen=True, slots=True)
class Evidence:
    """One device's figures on the change (``new``) and before it (``old``; None: no baseline)."""

    device_id: str
    new: Figures
    old: Figures | None


@dataclass(frozen=True, slots=True)
class Verdict:
    passed: bool
    text: str  # what the wave's gate_result says


def load_gate(*, failed: int, settled: int, total: int, thresholds: Thresholds) -> Verdict | None:
    """The load-failure gate of a wave of ``total`` devices, ``settled`` of them applied or
    failed; None while the outcome can still go either way."""
    if total == 0:
        return Verdict(True, "no devices in this wave")
    limit = thresholds.max_load_failure_rate
    rate = failed / total
    text = f"load failures {failed}/{total} ({rate:.0%})"
    if limit > 0 and rate > limit:
        return Verdict(False, f"{text} above {limit:.0%}")
    if settled < total:
        return None
    return Verdict(True, text if limit > 0 or not failed else f"{text}, gate off")


def _names(items: Sequence[str]) -> str:
    shown = ", ".join(items[:MAX_NAMED])
    return shown if len(items) <= MAX_NAMED else f"{shown} and {len(items) - MAX_NAMED} more"


def _weighted(pairs: Sequence[tuple[float, int]]) -> float:
    weight = sum(w for _, w in pairs)
    return sum(value * w for value, w in pairs) / weight


def health_gates(evidence: Sequence[Evidence], thresholds: Thresholds) -> Verdict:
    """The error-rate, latency and tokens/s gates over a wave's devices after the soak."""
    enough = thresholds.enough_requests
    judged = [e for e in evidence if e.new.requests >= enough]
    unjudged = [f"{e.device_id} ({e.new.requests} < {enough} requests)" for e in evidence if e not in judged]
    failures: list[str] = []
    parts: list[str] = []

    requests = sum(e.new.requests for e in evidence)
    errors = sum(e.new.errors for e in evidence)
    if requests >= enough:
        rate = errors / requests
        serving = sum(1 for e in evidence if e.new.requests)
        parts.append(f"error rate {rate:.1%} ({errors}/{requests}) over {serving} device(s)")
        if thresholds.max_error_rate > 0 and rate > thresholds.max_error_rate:
            failures.append(f"error rate {rate:.1%} above {thresholds.max_error_rate:.1%}")
    else:
        parts.append(f"error rate not judged: {requests} < {enough} requests on the change")

    latency: list[tuple[float, int]] = []
    speed: list[tuple[float, int]] = []
    for e in judged:
        old = e.old
        if old is None or old.requests < enough:
            unjudged.append(f"{e.device_id} (no baseline)")
            continue
        new_p95, old_p95 = e.new.p95, old.p95
        if new_p95 is not None and old_p95:
            latency.append((new_p95 / old_p95, e.new.requests))
        new_tps, old_tps = e.new.tokens_per_second, old.tokens_per_second
        if new_tps is not None and old_tps:
            speed.append((new_tps / old_tps, e.new.requests))
    if latency:
        ratio = _weighted(latency)
        parts.append(f"p95 latency ratio {ratio:.2f} over {len(latency)} device(s)")
        if thresholds.max_p95_latency_ratio > 0 and ratio > thresholds.max_p95_latency_ratio:
            failures.append(f"p95 latency ratio {ratio:.2f} above {thresholds.max_p95_latency_ratio:g}")
    if speed:
        ratio = _weighted(speed)
        parts.append(f"tokens/s ratio {ratio:.2f} over {len(speed)} device(s)")
        if thresholds.min_tokens_per_second_ratio > 0 and ratio < thresholds.min_tokens_per_second_ratio:
            failures.append(f"tokens/s ratio {ratio:.2f} below {thresholds.min_tokens_per_second_ratio:g}")
    if unjudged:
        parts.append(f"not judged on ratios: {_names(unjudged)}")
    if failures:
        return Verdict(False, "; ".join([*failures, *parts]))
    return Verdict(True, "; ".join(parts))
