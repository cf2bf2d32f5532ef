"""The agent's gRPC channels to the control plane.

Retries of unary and server-streaming calls are declared in the channel's service config
(gRPC retries them transparently before any response arrived), not hand-rolled; keepalive
pings hold the desired-state stream open through NAT. Every channel is TLS, verified against
the fleet CA from the trust file; device calls also present the device's certificate.

Several control-plane replicas are reached through gRPC's own name resolution and load
balancing rather than a loop of ours: ``a:7443,b:7443`` (IP literals) becomes the target
``ipv4:a:7443,b:7443``, and a DNS name resolves to all its addresses. The service config's
``pick_first`` policy with ``shuffleAddressList`` keeps one connection per device (to a
replica chosen at random, so devices spread over the replicas) and, when that replica goes
away, connects to the next address; the retry policy replays the calls that failed with
UNAVAILABLE meanwhile.
"""

from __future__ import annotations

import ipaddress
import json

import grpc

from edgefleet.agent.device.tls import DeviceCertificate
from edgefleet.agent.errors import AgentError
from edgefleet.protos.fleet.v1 import device_pb2_grpc

RETRY_POLICY = {
    "maxAttempts": 5,
    "initialBackoff": "0.2s",
    "maxBackoff": "5s",
    "backoffMultiplier": 2,
    "retryableStatusCodes": ["UNAVAILABLE"],
}

SERVICE_CONFIG = {
    # One connection per device, to a replica picked at random among the resolved addresses;
    # the next address when it fails.
    "loadBalancingConfig": [{"pick_first": {"shuffleAddressList": True}}],
    "methodConfig": [
        {
            "name": [
                {"service": "fleet.v1.DeviceService", "method": "ReportStatus"},
                {"service": "fleet.v1.DeviceService", "method": "FetchArtifact"},
                {"service": "fleet.v1.DeviceService", "method": "FetchMetadata"},
                {"service": "fleet.v1.DeviceService", "method": "GetDesiredState"},
            ],
            "retryPolicy": RETRY_POLICY,
            "timeout": "600s",
        },
        {
            # Enrollment consumes a token: never replayed, and bounded in time.
            "name": [{"service": "fleet.v1.DeviceService", "method": "Enroll"}],
            "timeout": "30s",
        },
    ],
}

CHANNEL_OPTIONS: list[tuple[str, str | int]] = [
    ("grpc.service_config", json.dumps(SERVICE_CONFIG)),
    ("grpc.enable_retries", 1),
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.max_receive_message_length", 8 * 1024 * 1024),
    ("grpc.initial_reconnect_backoff_ms", 500),
    ("grpc.max_reconnect_backoff_ms", 10_000),
]

MAX_ADDRESSES = 64  # a list longer than this is a configuration mistake, not a fleet


class ChannelTargetError(AgentError, ValueError):
    """A control-plane address list gRPC cannot resolve as given, or whose certificate name is
    ambiguous."""


def _split(address: str) -> tuple[str, str]:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ChannelTargetError(f"expected HOST:PORT, got {address!r}")
    return host.strip("[]"), port


def _addresses(addresses: str) -> list[str]:
    parts = [part.strip() for part in addresses.split(",")]
    if not all(parts):
        raise ChannelTargetError(f"empty address in {addresses!r}")
    if len(parts) > MAX_ADDRESSES:
        raise ChannelTargetError(f"{len(parts)} control-plane addresses; at most {MAX_ADDRESSES}")
    return parts


def channel_target(addresses: str) -> str:
    """The gRPC target for ``addresses``: one HOST:PORT (a DNS name resolves to all its
    addresses) or a target URI (``dns:///name:7443``) as given; several comma-separated
    IP:PORT as an ``ipv4:`` or ``ipv6:`` list. Names in a list are refused: gRPC resolves a
    list only of IP literals (give one DNS name carrying every replica's address instead)."""
    parts = _addresses(addresses)
    if len(parts) == 1:
        return parts[0]
    families: set[int] = set()
    rendered = []
    for part in parts:
        host, port = _split(part)
        try:
            ip = ipaddress.ip_address(host)
        except ValueError as exc:
            raise ChannelTargetError(
                f"{host!r} in {addresses!r} is not an IP address: a list takes IP:PORT only; "
                "for names, use one DNS name that resolves to every replica"
            ) from exc
        families.add(ip.version)
        rendered.append(f"{ip}:{port}" if ip.version == 4 else f"[{ip}]:{port}")
    if len(families) > 1:
        raise ChannelTargetError(f"{addresses!r} mixes IPv4 and IPv6 addresses")
    return f"ipv{families.pop()}:{','.join(rendered)}"


def tls_server_name(addresses: str, server_name: str | None = None) -> str | None:
    """The name the control plane's certificate must carry: ``server_name`` when given (a
    name every replica's ``--tls-san`` adds); for a list of one host's ports, that host; for
    one address, None (gRPC checks the target's own host). A list of different hosts without
    ``server_name`` is refused: no single host name is the right one to check."""
    if server_name:
        return server_name
    parts = _addresses(addresses)
    if len(parts) == 1:
        return None
    hosts = {_split(part)[0] for part in parts}
    if len(hosts) > 1:
        raise ChannelTargetError(
            f"{addresses!r} names several hosts, and no one name to check their certificates "
            "against: use one DNS name that resolves to every replica and is in their --tls-san"
        )
    return hosts.pop()


def channel_options(
    addresses: str, server_name: str | None = None, *, idle_seconds: float | None = None
) -> list[tuple[str, str | int]]:
    """CHANNEL_OPTIONS, plus the certificate name to check when it is not the target's.

    ``idle_seconds``: the channel lets its connection go after that long without a call (gRPC's
    client idle timeout) and sends no keepalive pings meanwhile, so a device that learns of
    changes through the broker costs the control plane nothing while idle; the next call
    reconnects. None: the connection stays, for a desired-state stream."""
    options = list(CHANNEL_OPTIONS)
    if idle_seconds is not None:
        options = [(k, v) for k, v in options if k != "grpc.keepalive_permit_without_calls"]
        options += [
            ("grpc.keepalive_permit_without_calls", 0),
            ("grpc.client_idle_timeout_ms", max(1000, int(idle_seconds * 1000))),
        ]
    name = tls_server_name(addresses, server_name)
    if name is not None:
        options.append(("grpc.ssl_target_name_override", name))
    return options


def device_addresses(controlplane: str, device_endpoint: str) -> str:
    """The device endpoint's addresses: ``device_endpoint`` when it names a host, otherwise
    (``:PORT``) each control-plane host with that port, so a device enrolled through
    ``a:7443,b:7443`` reaches the device port of both."""
    host, _, port = device_endpoint.rpartition(":")
    if host:
        return device_endpoint
    return ",".join(f"{part.rpartition(':')[0]}:{port}" for part in _addresses(controlplane))


def open_enrollment_channel(target: str, ca_pem: bytes, server_name: str | None = None) -> grpc.aio.Channel:
    """Server-authenticated TLS: the device has no certificate of its own yet."""
    return grpc.aio.secure_channel(
        channel_target(target),
        grpc.ssl_channel_credentials(ca_pem),
        options=channel_options(target, server_name),
    )


class DeviceLink:
    """The device's mutual-TLS channels to ``target`` (one address, a DNS name or a list, see
    ``channel_target``): async for the agent's loops, blocking for ngclient's
    metadata fetcher. A renewed certificate opens new channels; callers take ``stub`` or
    ``sync_stub`` per call, so everything started afterwards presents the new certificate.

    Replaced channels are closed only once idle (gRPC moves a channel to IDLE when no call
    has used it for a while): a download or a desired-state stream in flight keeps its
    already-authenticated connection, and closing a channel under a call would cancel it.
    """

    def __init__(
        self,
        target: str,
        ca_pem: bytes,
        certificate: DeviceCertificate,
        server_name: str | None = None,
        *,
        idle_seconds: float | None = None,
    ) -> None:
        """``idle_seconds``: see ``channel_options`` (None: keep the connection)."""
        self.target = target
        self.ca_pem = ca_pem
        self._grpc_target = channel_target(target)
        self._options = channel_options(target, server_name, idle_seconds=idle_seconds)
        self._retired: list[tuple[grpc.aio.Channel, grpc.Channel]] = []
        self._open(certificate)

    def _open(self, certificate: DeviceCertificate) -> None:
        credentials = certificate.grpc_credentials(self.ca_pem)
        self.channel = grpc.aio.secure_channel(self._grpc_target, credentials, options=self._options)
        self.sync_channel = grpc.secure_channel(self._grpc_target, credentials, options=self._options)
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
