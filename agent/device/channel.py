"""The agent's gRPC channels to the control plane.

Retries of unary and server-streaming calls are declared in the channel's service config
(gRPC retries them transparently before any response arrived), not hand-rolled; keepalive
pings hold the desired-state stream open through NAT. Every channel is TLS, verified against
the fleet CA from the trust file; device calls also present the device's certificate.
"""

from __future__ import annotations

import json

import grpc

from edgefleet.agent.device.tls import DeviceCertificate
from edgefleet.protos.fleet.v1 import device_pb2_grpc

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


def open_enrollment_channel(target: str, ca_pem: bytes) -> grpc.aio.Channel:
    """Server-authenticated TLS: the device has no certificate of its own yet."""
    return grpc.aio.secure_channel(target, grpc.ssl_channel_credentials(ca_pem), options=CHANNEL_OPTIONS)


class DeviceLink:
    """The device's mutual-TLS channels: async for the agent's loops, blocking for ngclient's
    metadata fetcher. A renewed certificate opens new channels; callers take ``stub`` or
    ``sync_stub`` per call, so everything started afterwards presents the new certificate.

    Replaced channels are closed only once idle (gRPC moves a channel to IDLE when no call
    has used it for a while): a download or a desired-state stream in flight keeps its
    already-authenticated connection, and closing a channel under a call would cancel it.
    """

    def __init__(self, target: str, ca_pem: bytes, certificate: DeviceCertificate) -> None:
        self.target = target
        self.ca_pem = ca_pem
        self._retired: list[tuple[grpc.aio.Channel, grpc.Channel]] = []
        self._open(certificate)

    def _open(self, certificate: DeviceCertificate) -> None:
        credentials = certificate.grpc_credentials(self.ca_pem)
        self.channel = grpc.aio.secure_channel(self.target, credentials, options=CHANNEL_OPTIONS)
        self.sync_channel = grpc.secure_channel(self.target, credentials, options=CHANNEL_OPTIONS)
        self.stub = device_pb2_grpc.DeviceServiceStub(self.channel)
        self.sync_stub = device_pb2_grpc.DeviceServiceStub(self.sync_channel)

    async def replace(self, certificate: DeviceCertificate) -> None:
        """Switches to channels presenting ``certificate``; closes retired ones that are idle."""
        self._retired.append((self.channel, self.sync_channel))
        self._open(certificate)
        busy = []
        for channel, sync_channel in self._retired:
            if channel.get_state(try_to_connect=False) == grpc.ChannelConnectivity.IDLE:
                await channel.close()
                sync_channel.close()
            else:
                busy.append((channel, sync_channel))
        self._retired = busy

    async def close(self) -> None:
        for channel, sync_channel in [*self._retired, (self.channel, self.sync_channel)]:
            await channel.close()
            sync_channel.close()
        self._retired = []
