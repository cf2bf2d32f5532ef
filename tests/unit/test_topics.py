from __future__ import annotations

import pytest

from edgefleet.protos.fleet import topics
from edgefleet.protos.fleet.topics import TopicError, TopicKind


def test_round_trip() -> None:
    topic = topics.telemetry_topic("dev-1", TopicKind.INFERENCE)
    assert topic == "fleet/v1/devices/dev-1/telemetry/inference"
    parsed = topics.parse_telemetry_topic(topic)
    assert parsed.device_id == "dev-1"
    assert parsed.kind is TopicKind.INFERENCE


@pytest.mark.parametrize("device_id", ["", "a/b", "+", "#", "x\x00"])
def test_device_ids_that_would_break_acls_are_refused(device_id: str) -> None:
    with pytest.raises(TopicError):
        topics.device_prefix(device_id)


@pytest.mark.parametrize(
    "topic",
    [
        "other/v1/devices/d/telemetry/heartbeat",
        "fleet/v1/devices/d/telemetry/unknown",
        "fleet/v1/devices/d/status/heartbeat",
        "fleet/v1/devices/d/telemetry/heartbeat/extra",
    ],
)
def test_bad_topics(topic: str) -> None:
    with pytest.raises(TopicError):
        topics.parse_telemetry_topic(topic)


def test_subscription_matches_every_device() -> None:
    assert topics.telemetry_subscription() == "fleet/v1/devices/+/telemetry/+"
