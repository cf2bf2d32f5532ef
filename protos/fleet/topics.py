"""MQTT topic names of the telemetry contract, built in one place for both sides.

Every device publishes under its own prefix ``fleet/v1/devices/{device_id}/`` so a broker ACL
can confine a device to its own topics with one pattern (Mosquitto: ``pattern write
fleet/v1/devices/%u/#``).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import TypeAlias

from protos.fleet.v1 import telemetry_pb2

ROOT = "fleet/v1/devices"


class TopicKind(enum.StrEnum):
    """The telemetry streams a device publishes; the value is the last topic level."""

    HEARTBEAT = "heartbeat"
    INFERENCE = "inference"
    DEPLOYMENT = "deployment"


TelemetryMessage: TypeAlias = (
    telemetry_pb2.Heartbeat | telemetry_pb2.InferenceRecord | telemetry_pb2.DeploymentEvent
)

# The message each telemetry topic carries: a topic never lies about its payload.
MESSAGE_TYPES: dict[TopicKind, type[TelemetryMessage]] = {
    TopicKind.HEARTBEAT: telemetry_pb2.Heartbeat,
    TopicKind.INFERENCE: telemetry_pb2.InferenceRecord,
    TopicKind.DEPLOYMENT: telemetry_pb2.DeploymentEvent,
}


class TopicError(ValueError):
    """A topic or device id that does not fit the contract."""


def _check_device_id(device_id: str) -> str:
    if not device_id or any(c in device_id for c in "/+#\x00"):
        raise TopicError(f"device id {device_id!r} cannot be used in an MQTT topic")
    return device_id


def device_prefix(device_id: str) -> str:
    """The prefix all of one device's topics live under."""
    return f"{ROOT}/{_check_device_id(device_id)}"


def telemetry_topic(device_id: str, kind: TopicKind) -> str:
    """The topic a device publishes one kind of telemetry on."""
    return f"{device_prefix(device_id)}/telemetry/{kind.value}"


def telemetry_subscription() -> str:
    """The filter the control plane subscribes with to receive every device's telemetry."""
    return f"{ROOT}/+/telemetry/+"


@dataclass(frozen=True, slots=True)
class ParsedTopic:
    device_id: str
    kind: TopicKind


def parse_telemetry_topic(topic: str) -> ParsedTopic:
    """Splits a telemetry topic into device id and kind, or raises TopicError."""
    prefix = ROOT + "/"
    if not topic.startswith(prefix):
        raise TopicError(f"not a device topic: {topic!r}")
    parts = topic[len(prefix) :].split("/")
    if len(parts) != 3 or parts[1] != "telemetry":
        raise TopicError(f"not a telemetry topic: {topic!r}")
    try:
        kind = TopicKind(parts[2])
    except ValueError as exc:
        raise TopicError(f"unknown telemetry kind in {topic!r}") from exc
    return ParsedTopic(device_id=_check_device_id(parts[0]), kind=kind)
