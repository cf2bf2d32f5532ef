"""Per-interval inference figures: what each model served between two flushes.

One telemetry record per request would cost an fsync per request on the device and flood the
broker and the database on a busy one; so the API's per-request ``InferenceStats`` are folded
here, in memory, and leave as one summary per model and interval.

Rules, per (model, serving release) and interval:

- ``requests``, ``errors``, ``errors_by_code``, ``requests_by_endpoint``, ``prompt_tokens`` and
  ``completion_tokens`` are exact sums over every request, failed ones included (a failed
  request's tokens were still processed).
- Latency and time-to-first-token figures describe successful requests only: a refused request
  (429 ``queue_full``, 400) answers in microseconds and would make an overloaded device look
  fast. Errors are counted, not timed. Time to first token is over the successful requests that
  have one (streamed or not; embeddings have none).
- ``latency_ms_max`` is exact. The percentiles are exact up to ``max_samples`` timed requests per
  interval and model; beyond that they come from a uniform random sample of ``max_samples``
  values (reservoir sampling), so memory stays bounded however busy the interval is.
- ``tokens_per_second`` is token-weighted: the decoded tokens of all successful generations over
  their summed decode time (``InferenceStats.decode_tokens`` / ``decode_seconds``), not a mean of
  per-request rates, which would let a 2-token reply weigh as much as a 500-token one.
- A request is attributed to the release serving its model when it is recorded; if a model's
  release changes mid-interval, that interval has one summary per release.
- At most ``max_models`` distinct keys per interval: requests beyond that (clients naming many
  unknown models) are counted under model ``""`` so no request goes uncounted.
"""

from __future__ import annotations

import random
import statistics
import threading
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

from edgefleet.agent.stats import InferenceStats

DEFAULT_MAX_SAMPLES = 1024
DEFAULT_MAX_MODELS = 64
UNATTRIBUTED_MODEL = ""
"""The model under which requests are counted once an interval holds ``max_models`` keys."""


def _utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True, slots=True)
class ServedRelease:
    """The installed release serving a model name: a summary's bundle, version and variant."""

    bundle: str
    version: int
    variant: str


def percentiles(values: Sequence[float], points: Sequence[int]) -> tuple[float, ...]:
    """The given percentiles (1..99) by linear interpolation between order statistics, numpy's
    default; one value is every percentile of itself, and no values give zeros."""
    if not values:
        return tuple(0.0 for _ in points)
    if len(values) == 1:
        return tuple(float(values[0]) for _ in points)
    cuts = statistics.quantiles(values, n=100, method="inclusive")
    return tuple(cuts[p - 1] for p in points)


class Reservoir:
    """A uniform random sample of at most ``capacity`` values of a stream (Vitter's algorithm R):
    percentiles of a busy interval without keeping every value."""

    __slots__ = ("_capacity", "_rng", "seen", "values")

    def __init__(self, capacity: int, rng: random.Random) -> None:
        self._capacity = capacity
        self._rng = rng
        self.seen = 0
        self.values: list[float] = []

    def add(self, value: float) -> None:
        self.seen += 1
        if len(self.values) < self._capacity:
            self.values.append(value)
            return
        slot = self._rng.randrange(self.seen)
        if slot < self._capacity:
            self.values[slot] = value


@dataclass(frozen=True, slots=True)
class ModelSummary:
    """What one model (served by one release) did during one interval."""

    model: str
    release: ServedRelease | None
    requests: int
    errors: int
    errors_by_code: Mapping[str, int]
    requests_by_endpoint: Mapping[str, int]
    prompt_tokens: int
    completion_tokens: int
    latency_ms_p50: float
    latency_ms_p95: float
    latency_ms_max: float
    time_to_first_token_ms_p50: float
    time_to_first_token_ms_p95: float
    tokens_per_second: float
    decode_tokens: int = 0
    decode_seconds: float = 0.0


@dataclass(frozen=True, slots=True)
class InferenceWindow:
    """One closed interval: ``start`` (inclusive) to ``end``, and a summary per model that served."""

    start: datetime
    end: datetime
    summaries: tuple[ModelSummary, ...]

    @property
    def requests(self) -> int:
        return sum(s.requests for s in self.summaries)


_Key = tuple[str, ServedRelease | None]


@dataclass(slots=True)
class _Running:
    """The open interval's figures of one key; mutated under the aggregator's lock only."""

    latency: Reservoir
    ttft: Reservoir
    requests: int = 0
    errors: int = 0
    errors_by_code: Counter[str] = field(default_factory=Counter)
    requests_by_endpoint: Counter[str] = field(default_factory=Counter)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    latency_ms_max: float = 0.0
    decode_tokens: int = 0
    decode_seconds: float = 0.0

    def add(self, stats: InferenceStats) -> None:
        self.requests += 1
        self.requests_by_endpoint[stats.endpoint] += 1
        self.prompt_tokens += max(0, stats.prompt_tokens)
        self.completion_tokens += max(0, stats.completion_tokens)
        if stats.error:
            self.errors += 1
            self.errors_by_code[stats.error] += 1
            return
        self.latency.add(stats.latency_ms)
        self.latency_ms_max = max(self.latency_ms_max, stats.latency_ms)
        if stats.time_to_first_token_ms > 0:
            self.ttft.add(stats.time_to_first_token_ms)
        self.decode_tokens += stats.decode_tokens
        self.decode_seconds += stats.decode_seconds

    def summary(self, key: _Key) -> ModelSummary:
        latency_p50, latency_p95 = percentiles(self.latency.values, (50, 95))
        ttft_p50, ttft_p95 = percentiles(self.ttft.values, (50, 95))
        rate = self.decode_tokens / self.decode_seconds if self.decode_seconds > 0 else 0.0
        return ModelSummary(
            model=key[0],
            release=key[1],
            requests=self.requests,
            errors=self.errors,
            errors_by_code=dict(self.errors_by_code),
            requests_by_endpoint=dict(self.requests_by_endpoint),
            prompt_tokens=self.prompt_tokens,
            completion_tokens=self.completion_tokens,
            latency_ms_p50=latency_p50,
            latency_ms_p95=latency_p95,
            latency_ms_max=self.latency_ms_max,
            time_to_first_token_ms_p50=ttft_p50,
            time_to_first_token_ms_p95=ttft_p95,
            tokens_per_second=rate,
            decode_tokens=self.decode_tokens,
            decode_seconds=self.decode_seconds,
        )


class InferenceAggregator:
    """Folds per-request stats into per-model figures until ``drain()`` closes the interval.

    Thread-safe: the API's event loop calls ``add`` while a flush thread calls ``drain``; both
    hold one lock briefly (percentiles are computed after the lock is released). Memory is
    bounded per interval by ``max_models`` keys (plus the unattributed one) of at most
    ``2 * max_samples`` floats each (latency and time-to-first-token reservoirs, 1024 by
    default) and a few counters; nothing outlives the interval.
    """

    def __init__(
        self,
        *,
        clock: Callable[[], datetime] = _utcnow,
        max_samples: int = DEFAULT_MAX_SAMPLES,
        max_models: int = DEFAULT_MAX_MODELS,
        rng: random.Random | None = None,
    ) -> None:
        """``rng`` picks which samples a full reservoir keeps; pass a seeded one in tests."""
        if max_samples < 1 or max_models < 1:
            raise ValueError("max_samples and max_models must be at least 1")
        self._clock = clock
        self._max_samples = max_samples
        self._max_models = max_models
        self._rng = rng or random.Random()
        self._lock = threading.Lock()
        self._running: dict[_Key, _Running] = {}
        self._window_start = clock()
        self._recorded = 0

    @property
    def pending(self) -> int:
        """Requests folded into the open interval, not yet drained."""
        with self._lock:
            return sum(entry.requests for entry in self._running.values())

    @property
    def recorded(self) -> int:
        """Requests ever added, over this aggregator's life."""
        with self._lock:
            return self._recorded

    def add(self, stats: InferenceStats, release: ServedRelease | None = None) -> None:
        """Folds one request into the open interval; ``release`` is what served ``stats.model``."""
        with self._lock:
            self._entry((stats.model, release)).add(stats)
            self._recorded += 1

    def _entry(self, key: _Key) -> _Running:
        """Caller holds the lock; past ``max_models`` keys a new key folds into the unattributed one."""
        entry = self._running.get(key)
        if entry is not None:
            return entry
        if len(self._running) >= self._max_models:
            key = (UNATTRIBUTED_MODEL, None)
            entry = self._running.get(key)
            if entry is not None:
                return entry
        entry = _Running(
            latency=Reservoir(self._max_samples, self._rng), ttft=Reservoir(self._max_samples, self._rng)
        )
        self._running[key] = entry
        return entry

    def drain(self) -> InferenceWindow:
        """Closes the open interval now and opens the next, which starts where this one ends.

        Models without a request in the interval have no summary; summaries are ordered by
        model name so a reader sees a stable order.
        """
        with self._lock:
            end = self._clock()
            start, self._window_start = self._window_start, end
            running, self._running = self._running, {}
        summaries = sorted(
            (entry.summary(key) for key, entry in running.items()),
            key=lambda s: (s.model, s.release.version if s.release else -1),
        )
        return InferenceWindow(start=start, end=end, summaries=tuple(summaries))
