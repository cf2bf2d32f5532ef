"""Telemetry of simulated devices: the InferenceSummary an agent would publish, and one MQTT
connection publishing it for every simulated device.

One connection for the whole fleet, not one per device: the tests' Mosquitto allows anonymous
clients and has no ACL. A broker that checks device certificates (deploy/mosquitto/) would
refuse it; that path is the agent's.
"""

from __future__ import annotations

import secrets
import threading
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.reasoncodes import ReasonCode

from bench.sim_device import VARIANT, SimDevice
from edgefleet.protos.fleet.broker_url import configure_client, parse_broker_url
from edgefleet.protos.fleet.v1 import common_pb2, telemetry_pb2


class TelemetryLink:
    """One MQTT v5 (or 3.1.1) connection publishing for every simulated device."""

    def __init__(self, url: str) -> None:
        self.address = parse_broker_url(url)
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=f"edgefleet-simfleet-{secrets.token_hex(4)}",
            protocol=self.address.protocol,
        )
        configure_client(self.client, self.address)
        self.connected = threading.Event()
        self.client.on_connect = self._on_connect

    def _on_connect(
        self, client: mqtt.Client, userdata: Any, flags: Any, reason: ReasonCode, props: Any
    ) -> None:
        if not reason.is_failure:
            self.connected.set()

    def open(self, timeout: float) -> None:
        """Blocking: connects and waits for the broker's CONNACK."""
        self.client.connect(self.address.host, self.address.port)
        self.client.loop_start()
        if not self.connected.wait(timeout):
            self.close()
            raise TimeoutError(f"no CONNACK from {self.address.url} within {timeout:.0f}s")

    def publish_all(self, messages: list[tuple[str, bytes]], timeout: float) -> None:
        """Blocking: publishes at QoS 1 and returns once the broker acknowledged every one."""
        infos = [self.client.publish(topic, payload, qos=1) for topic, payload in messages]
        deadline = time.monotonic() + timeout
        for info in infos:
            info.wait_for_publish(max(0.0, deadline - time.monotonic()))
        unacked = sum(not info.is_published() for info in infos)
        if unacked:
            raise TimeoutError(f"{unacked} telemetry messages unacknowledged after {timeout:.0f}s")

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def inference_summary(
    device: SimDevice,
    name: str,
    version: int,
    *,
    tokens_per_second: float,
    latency_ms: float,
    requests: int,
    errors: int,
    window: timedelta,
) -> telemetry_pb2.InferenceSummary:
    """One interval's summary as the agent's aggregator fills it: ``requests`` chat requests of
    20 prompt and 32 completion tokens each, decoded at ``tokens_per_second``, every latency
    percentile ``latency_ms``."""
    ok = max(requests - errors, 0)
    decode_tokens = ok * 31  # completion tokens after each request's first
    device.seq += 1
    summary = telemetry_pb2.InferenceSummary(
        schema_version=telemetry_pb2.TELEMETRY_SCHEMA_V1,
        device_id=device.device_id,
        seq=device.seq,
        model=name,
        bundle=common_pb2.BundleRef(name=name, version=version),
        variant=VARIANT,
        requests=requests,
        errors=errors,
        errors_by_code={"runtime_error": errors} if errors else {},
        requests_by_endpoint={"chat.completions": requests},
        prompt_tokens=requests * 20,
        completion_tokens=ok * 32,
        latency_ms_p50=latency_ms,
        latency_ms_p95=latency_ms,
        latency_ms_max=latency_ms,
        time_to_first_token_ms_p50=latency_ms / 4,
        time_to_first_token_ms_p95=latency_ms / 4,
        tokens_per_second=tokens_per_second if ok else 0.0,
        decode_tokens=decode_tokens,
        decode_seconds=decode_tokens / tokens_per_second if ok and tokens_per_second > 0 else 0.0,
    )
    now = datetime.now(UTC)
    summary.time.FromDatetime(now)
    summary.window_start.FromDatetime(now - window)
    return summary
