"""MQTT topic names of the telemetry contract, built in one place for both sides.

Every device publishes under its own prefix ``fleet/v1/devices/{device_id}/`` so a broker ACL
can confine a device to its own topics with one pattern (Mosquitto: ``pattern write
fleet/v1/devices/%u/#``).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import TypeAlias

from edgefleet.protos.fleet.v1 import telemetry_pb2

ROOT = "fleet/v1/devices"


class TopicKind(enum.StrEnum):
    """The telemetry streams a device publishes; the value is the last topic level."""

    HEARTBEAT = "heartbeat"
    INFERENCE = "inference"
    DEPLOYMENT = "deployment"


TelemetryMessage: TypeAlias = (
    telemetry_pb2.Heartbeat | telemetry_pb2.InferenceSummary | telemetry_pb2.DeploymentEvent
)

# The record type each telemetry topic carries (as a JSON array of them): a topic never lies
# about its payload.
MESSAGE_TYPES: dict[TopicKind, type[TelemetryMessage]] = {
    TopicKind.HEARTBEAT: telemetry_pb2.Heartbeat,
    TopicKind.INFERENCE: telemetry_pb2.InferenceSummary,
    TopicKind.DEPLOYMENT: telemetry_pb2.DeploymentEvent,
}

METRIC_KINDS = frozenset({TopicKind.HEARTBEAT, TopicKind.INFERENCE})
"""Streams whose records go stale: the outbox drops them first when full, and the broker may
expire them (MQTT v5 message expiry). Deployment events are neither dropped early nor expired."""

PRESENCE = "presence"
STATUS = "status"
DESIRED = "desired"
SHARED_GROUP = "controlplane"
"""The shared-subscription group every control-plane replica joins, so each message reaches one."""


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


def presence_topic(device_id: str) -> str:
    """Retained Presence of one device; the agent's Last Will publishes its offline value."""
    return f"{device_prefix(device_id)}/{PRESENCE}"


def status_topic(device_id: str) -> str:
    """Retained DeviceStatus of one device: its latest state, models and generation."""
    return f"{device_prefix(device_id)}/{STATUS}"


def desired_topic(device_id: str) -> str:
    """Where the control plane announces a change of one device's desired state (a DesiredState
    in protobuf's JSON mapping, QoS 0, not retained): the device learns of changes over the
    connection it keeps to the broker anyway. A hint only, like the stream's: the agent installs
    what signed metadata says, and polls the control plane when (re)subscribing."""
    return f"{device_prefix(device_id)}/{DESIRED}"


def presence_subscription() -> str:
    return f"{ROOT}/+/{PRESENCE}"


def status_subscription() -> str:
    return f"{ROOT}/+/{STATUS}"


def shared(topic_filter: str, group: str = SHARED_GROUP) -> str:
    """An MQTT v5 shared subscription: the broker gives each message to one member of ``group``."""
    return f"$share/{group}/{topic_filter}"


def device_of(topic: str, leaf: str) -> str:
    """The device id of ``fleet/v1/devices/{id}/{leaf}``, or TopicError."""
    prefix = ROOT + "/"
    parts = topic[len(prefix) :].split("/") if topic.startswith(prefix) else []
    if len(parts) != 2 or parts[1] != leaf:
        raise TopicError(f"not a {leaf} topic: {topic!r}")
    return _check_device_id(parts[0])


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
