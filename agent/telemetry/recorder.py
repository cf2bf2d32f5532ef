"""What the rest of the agent calls to report something: build the message, queue it, nudge.

Callers (the API after each request, the lifecycle on each state change, the heartbeat timer)
should not know about protobuf, sequence numbers, MQTT or SQLite. Recording never raises: a
full disk or a broken outbox is logged and counted, because serving a user's request matters
more than the telemetry about it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import UTC, datetime
from typing import cast

from agent.selection import Selection
from agent.stats import InferenceStats
from agent.telemetry.outbox import Outbox, OutboxError
from protos.fleet.topics import TelemetryMessage, TopicKind
from protos.fleet.v1 import common_pb2, telemetry_pb2

logger = logging.getLogger(__name__)


def _utcnow() -> datetime:
    return datetime.now(UTC)


class Telemetry:
    """The agent's telemetry entry point; one per device, shared by all threads."""

    def __init__(
        self,
        *,
        device_id: str,
        outbox: Outbox,
        nudge: Callable[[], None] | None = None,
        clock: Callable[[], datetime] = _utcnow,
    ) -> None:
        """``nudge`` is usually ``TelemetryPublisher.nudge``: it wakes the sender right away."""
        self._device_id = device_id
        self._outbox = outbox
        self._nudge = nudge
        self._clock = clock
        self._lost = 0

    @property
    def lost(self) -> int:
        """Records that could not be queued because the outbox failed."""
        return self._lost

    def record_inference(self, stats: InferenceStats) -> int | None:
        """Queues one served request's figures; returns its seq, or None if it could not be stored."""
        message = telemetry_pb2.InferenceRecord(
            model=stats.model,
            endpoint=stats.endpoint,
            prompt_tokens=stats.prompt_tokens,
            completion_tokens=stats.completion_tokens,
            latency_ms=stats.latency_ms,
            time_to_first_token_ms=stats.time_to_first_token_ms,
            tokens_per_second=stats.tokens_per_second,
            stream=stats.stream,
            error=stats.error,
        )
        return self._record(TopicKind.INFERENCE, message)

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
    ) -> int | None:
        """Queues a liveness report; ``state`` is a fleet.v1.DeviceState value."""
        message = telemetry_pb2.Heartbeat(
            state=cast("common_pb2.DeviceState", state),
            api_url=api_url,
            rss_bytes=max(0, rss_bytes),
            uptime_seconds=uptime_seconds,
            requests_total=max(0, requests_total),
            variant=variant,
        )
        if active_bundle is not None:
            message.active_bundle.CopyFrom(_bundle_ref(active_bundle))
        return self._record(TopicKind.HEARTBEAT, message)

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

    def _record(self, kind: TopicKind, message: TelemetryMessage) -> int | None:
        message.schema_version = telemetry_pb2.TELEMETRY_SCHEMA_V1
        message.device_id = self._device_id
        message.time.FromDatetime(self._clock())
        try:
            seq = self._outbox.put(kind, message)
        except OutboxError:
            self._lost += 1
            logger.exception("could not queue %s telemetry; %d records lost so far", kind.value, self._lost)
            return None
        if self._nudge is not None:
            self._nudge()
        return seq


def _bundle_ref(bundle: tuple[str, int]) -> common_pb2.BundleRef:
    name, version = bundle
    return common_pb2.BundleRef(name=name, version=version)
