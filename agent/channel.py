"""The agent's gRPC channel to the control plane.

Retries of unary and server-streaming calls are declared in the channel's service config
(gRPC retries them transparently before any response arrived), not hand-rolled; keepalive
pings hold the desired-state stream open through NAT.
"""

from __future__ import annotations

import json

import grpc

RETRY_POLICY = {
    "maxAttempts": 5,
    "initialBackoff": "0.2s",
    "maxBackoff": "5s",
    "backoffMultiplier": 2,
    "retryableStatusCodes": ["UNAVAILABLE"],
}

SERVICE_CONFIG = {
    "methodConfig": [
        {
            "name": [
                {"service": "fleet.v1.DeviceService", "method": "ReportStatus"},
                {"service": "fleet.v1.DeviceService", "method": "FetchArtifact"},
                {"service": "fleet.v1.DeviceService", "method": "FetchMetadata"},
            ],
            "retryPolicy": RETRY_POLICY,
            "timeout": "600s",
        },
        {
            # Enrollment consumes a token: never replayed, and bounded in time.
            "name": [{"service": "fleet.v1.DeviceService", "method": "Enroll"}],
            "timeout": "30s",
        },
    ]
}

CHANNEL_OPTIONS = [
    ("grpc.service_config", json.dumps(SERVICE_CONFIG)),
    ("grpc.enable_retries", 1),
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.max_receive_message_length", 8 * 1024 * 1024),
    ("grpc.initial_reconnect_backoff_ms", 500),
    ("grpc.max_reconnect_backoff_ms", 10_000),
]


def open_channel(target: str) -> grpc.aio.Channel:
    """Plain-text channel for now; mutual TLS with device certificates replaces it."""
    return grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS)
