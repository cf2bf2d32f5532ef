"""What the rest of the agent calls to report something: build the message, queue it, nudge.

Callers (the API after each request, the lifecycle on each state change, the heartbeat timer)
should not know about protobuf, sequence numbers, MQTT or SQLite. Recording never raises: a
full disk or a broken outbox is logged and counted, because serving a user's request matters
more than the telemetry about it.

Inference is the exception to "one call, one record": requests are folded in memory by an
``InferenceAggregator`` and leave as one ``InferenceSummary`` per model when
``flush_inference`` closes the interval (the agent calls it on a timer and once at stop). The
timer is a ``FlushSchedule``, whose interval a signed device config may change at any time.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from typing import cast

from edgefleet.agent.stats import InferenceStats
from edgefleet.agent.telemetry.aggregate import (
    InferenceAggregator,
    InferenceWindow,
    ModelSummary,
    ServedRelease,
)
from edgefleet.agent.telemetry.outbox import Outbox, OutboxError
from edgefleet.agent.update.selection import Selection
from edgefleet.protos.fleet.topics import TelemetryMessage, TopicKind
from edgefleet.protos.fleet.v1 import common_pb2, telemetry_pb2

logger = logging.getLogger(__name__)

ReleaseLookup = Callable[[str], ServedRelease | None]
"""The release serving a model name now, or None: a summary's bundle and variant."""


def _utcnow() -> datetime:
    return datetime.now(UTC)


def _no_release(model: str) -> ServedRelease | None:
    return None


class FlushSchedule:
    """When the open inference interval is due to close.

    The flush loop asks ``due_in`` each time round, so a changed ``interval_seconds`` takes
    effect in the interval already open: shortened below the time it has run, it closes at the
    next check; lengthened, it runs on. Time is monotonic: a wall-clock step does not close or
    stretch an interval.
    """

    def __init__(self, interval_seconds: float, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._interval_seconds = _checked_interval(interval_seconds)
        self._opened = clock()

    @property
    def interval_seconds(self) -> float:
        return self._interval_seconds

    @interval_seconds.setter
    def interval_seconds(self, value: float) -> None:
        self._interval_seconds = _checked_interval(value)

    def due_in(self) -> float:
        """Seconds until the open interval should close (0 or less: now)."""
        return self._opened + self._interval_seconds - self._clock()

    def flushed(self) -> None:
        """The open interval closed now; the next one starts."""
        self._opened = self._clock()


def _checked_interval(value: float) -> float:
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"the telemetry interval must be a positive number of seconds, got {value}")
    return float(value)


class Telemetry:
    """The agent's telemetry entry point; one per device, shared by all threads."""

    def __init__(
        self,
        *,
        device_id: str,
        outbox: Outbox,
        nudge: Callable[[], None] | None = None,
        clock: Callable[[], datetime] = _utcnow,
        release_of: ReleaseLookup = _no_release,
        aggregator: InferenceAggregator | None = None,
    ) -> None:
        """``nudge`` is usually ``TelemetryPublisher.nudge``: it wakes the sender right away.

        ``release_of`` names the release serving a model (the agent passes its state's lookup).
        ``aggregator`` is the interval being filled; pass one to keep requests recorded before
        this object existed, or to control its clock and sample bound (default: a fresh one on
        ``clock``).
        """
        self._device_id = device_id
        self._outbox = outbox
        self._nudge = nudge
        self._clock = clock
        self._release_of = release_of
        self._aggregator = aggregator if aggregator is not None else InferenceAggregator(clock=clock)
        self._flush_lock = threading.Lock()  # one flush at a time: windows reach the outbox in order
        self._counts_lock = threading.Lock()
        self._lost = 0
        self._requests_lost = 0
        self._outbox_resets = 0
        self._records_lost_in_resets = 0

    @property
    def lost(self) -> int:
        """Records that could not be queued because the outbox failed."""
        with self._counts_lock:
            return self._lost

    def note_outbox_reset(self, lost_records: int | None) -> None:
        """A corrupt outbox was replaced; ``lost_records`` it held (None: unknown) are gone."""
        with self._counts_lock:
            self._outbox_resets += 1
            self._records_lost_in_resets += lost_records or 0

    @property
    def requests_lost(self) -> int:
        """Requests whose figures were in a summary the outbox could not take."""
        with self._counts_lock:
            return self._requests_lost

    @property
    def inference_pending(self) -> int:
        """Requests recorded in the open interval, waiting for the next ``flush_inference``."""
        return self._aggregator.pending

    def record_inference(self, stats: InferenceStats) -> None:
        """Folds one request's figures into the open interval: memory only, fine on the event loop."""
        self._aggregator.add(stats, self._release(stats.model))

    def _release(self, model: str) -> ServedRelease | None:
        try:
            return self._release_of(model)
        except Exception:  # a summary without its release beats a request without figures
            logger.exception("could not look up the release serving %r", model)
            return None

    def flush_inference(self) -> list[int]:
        """Closes the interval and queues one InferenceSummary per model that served a request.

        Returns the seqs queued. Blocking (one fsync per summary): call it from a thread. The
        requests of a summary the outbox refuses are counted in ``requests_lost``.
        """
        with self._flush_lock:
            window = self._aggregator.drain()
            seqs = []
            for summary in window.summaries:
                seq = self._record(TopicKind.INFERENCE, _summary_message(window, summary), at=window.end)
                if seq is None:
                    with self._counts_lock:
                        self._requests_lost += summary.requests
                else:
                    seqs.append(seq)
        return seqs

    def record_heartbeat(
        self,
        *,
        state: int,
        active_bundle: tuple[str, int] | None,
        api_url: str,
        rss_bytes: int,
        uptime_seconds: float,
        requests_total: int,
        variant: str,
        cpu_percent: float = 0.0,
        memory_available_bytes: int = 0,
        disk_free_bytes: int = 0,
        models: Iterable[common_pb2.InstalledModel] = (),
    ) -> int | None:
        """Queues a liveness report; ``state`` is a fleet.v1.DeviceState value.

        The pipeline counters (records produced and dropped, outbox backlog) are read from the
        outbox here, so a reader can tell lost telemetry from a quiet device.
        """
        message = telemetry_pb2.Heartbeat(
            state=cast("common_pb2.DeviceState", state),
            api_url=api_url,
            rss_bytes=max(0, rss_bytes),
            uptime_seconds=uptime_seconds,
            requests_total=max(0, requests_total),
            variant=variant,
            cpu_percent=max(0.0, cpu_percent),
            memory_available_bytes=max(0, memory_available_bytes),
            disk_free_bytes=max(0, disk_free_bytes),
            models=list(models),
        )
        if active_bundle is not None:
            message.active_bundle.CopyFrom(_bundle_ref(active_bundle))
        self._add_pipeline_counters(message)
        return self._record(TopicKind.HEARTBEAT, message)

    def counters(self) -> dict[str, int]:
        """The pipeline's own counts, for /healthz: what was produced, what waits, what was lost.

        Once ``pending`` and ``inference_pending`` are 0, the control plane holds
        ``produced - dropped`` records of this device (each once)."""
        try:
            produced, dropped, pending = self._outbox.next_seq - 1, self._outbox.dropped, len(self._outbox)
        except OutboxError:
            produced = dropped = pending = -1  # unknown: the outbox failed
        return {
            "produced": produced,
            "dropped": dropped,
            "pending": pending,
            "lost": self.lost,
            "requests_lost": self.requests_lost,
            "inference_pending": self.inference_pending,
            "outbox_resets": self._outbox_resets,
            "records_lost_in_outbox_resets": self._records_lost_in_resets,
        }

    def _add_pipeline_counters(self, message: telemetry_pb2.Heartbeat) -> None:
        """Fills the outbox's counters; a failing outbox leaves them 0 (the put will fail too)."""
        try:
            message.records_produced = max(0, self._outbox.next_seq - 1)
            message.records_dropped = self._outbox.dropped + self._outbox.discarded
            message.outbox_pending = len(self._outbox)
        except OutboxError:
            logger.warning("could not read the telemetry outbox's counters for the heartbeat")

    def record_deployment(
        self,
        *,
        generation: int,
        bundle: tuple[str, int] | None,
        state: int,
        detail: str,
        selection: Selection | None = None,
    ) -> int | None:
        """Queues an update-lifecycle step; these are the last records the outbox drops.

        ``selection`` goes with the step where the agent chose a variant, so the fleet's
        telemetry says which variant each device picked, on what, and why the others lost.
        """
        message = telemetry_pb2.DeploymentEvent(
            generation=generation,
            state=cast("common_pb2.DeviceState", state),
            detail=detail,
        )
        if bundle is not None:
            message.bundle.CopyFrom(_bundle_ref(bundle))
        if selection is not None:
            message.selection.CopyFrom(selection.to_message())
        return self._record(TopicKind.DEPLOYMENT, message)

    def _record(
        self, kind: TopicKind, message: TelemetryMessage, *, at: datetime | None = None
    ) -> int | None:
        """Stamps and queues ``message``; ``at`` is its time (default: now)."""
        message.schema_version = telemetry_pb2.TELEMETRY_SCHEMA_V1
        message.device_id = self._device_id
        message.time.FromDatetime(self._clock() if at is None else at)
        try:
            seq = self._outbox.put(kind, message)
        except OutboxError:
            with self._counts_lock:
                self._lost += 1
                lost = self._lost
            logger.exception("could not queue %s telemetry; %d records lost so far", kind.value, lost)
            return None
        if self._nudge is not None:
            self._nudge()
        return seq


def _summary_message(window: InferenceWindow, summary: ModelSummary) -> telemetry_pb2.InferenceSummary:
    message = telemetry_pb2.InferenceSummary(
        model=summary.model,
        requests=summary.requests,
        errors=summary.errors,
        errors_by_code=dict(summary.errors_by_code),
        requests_by_endpoint=dict(summary.requests_by_endpoint),
        prompt_tokens=summary.prompt_tokens,
        completion_tokens=summary.completion_tokens,
        latency_ms_p50=summary.latency_ms_p50,
        latency_ms_p95=summary.latency_ms_p95,
        latency_ms_max=summary.latency_ms_max,
        time_to_first_token_ms_p50=summary.time_to_first_token_ms_p50,
        time_to_first_token_ms_p95=summary.time_to_first_token_ms_p95,
        tokens_per_second=summary.tokens_per_second,
        decode_tokens=summary.decode_tokens,
        decode_seconds=summary.decode_seconds,
    )
    message.window_start.FromDatetime(window.start)
    if summary.release is not None:
        message.bundle.CopyFrom(_bundle_ref((summary.release.bundle, summary.release.version)))
        message.variant = summary.release.variant
    return message


def _bundle_ref(bundle: tuple[str, int]) -> common_pb2.BundleRef:
    name, version = bundle
    return common_pb2.BundleRef(name=name, version=version)
