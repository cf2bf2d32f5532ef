"""Per-peer token buckets for callers nobody vouches for yet.

Enrollment, and any call before a device or an operator is authenticated, costs a database
look-up and an audit entry; a stranger must not get those at line rate. Each refused call of
an unauthenticated peer spends a token of that peer's bucket; while the bucket is empty every
call from the peer is refused at once with RESOURCE_EXHAUSTED and the delay until it may try
again, before any work. Successful calls spend nothing, so a fleet enrolling thousands of
devices through one address with a good token is never slowed.

A peer is its IPv4 address or its IPv6 /64 (one host holds a whole /64). The table holds the
``max_peers`` most recently refused peers; an older one is forgotten, and starts full again.
"""

from __future__ import annotations

import functools
import ipaddress
import time
import urllib.parse
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.any_pb2 import Any as AnyMessage
from google.protobuf.duration_pb2 import Duration

STATUS_DETAILS_KEY = "grpc-status-details-bin"
RETRY_AFTER_KEY = "retry-after"


@dataclass(frozen=True, slots=True)
class RateLimit:
    burst: float = 20.0  # refused calls a peer may make at once
    per_second: float = 0.5  # refill: one more refused call every two seconds
    max_peers: int = 10_000


def peer_key(peer: str) -> str:
    """The bucket of a gRPC peer string ("ipv4:10.0.0.7:5123", "ipv6:%5B::1%5D:5123")."""
    scheme, _, rest = urllib.parse.unquote(peer).partition(":")
    if scheme == "ipv4":
        return rest.rpartition(":")[0] or rest
    if scheme == "ipv6":
        host = rest[1 : rest.find("]")] if rest.startswith("[") else rest.rpartition(":")[0]
        try:
            return str(ipaddress.IPv6Network(f"{host.partition('%')[0]}/64", strict=False))
        except ValueError:
            return host[:64]
    return scheme[:16] or "unknown"


class PeerLimiter:
    """Token buckets by peer key, least recently refused forgotten first."""

    def __init__(self, limit: RateLimit, clock: Callable[[], float] = time.monotonic) -> None:
        self.limit = limit
        self._clock = clock
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # tokens, as of

    def _tokens(self, peer: str) -> float:
        held = self._buckets.get(peer)
        if held is None:
            return self.limit.burst
        tokens, since = held
        return min(self.limit.burst, tokens + (self._clock() - since) * self.limit.per_second)

    def retry_after(self, peer: str) -> float:
        """Seconds until ``peer`` may call again; 0 when it may now."""
        missing = 1.0 - self._tokens(peer)
        return 0.0 if missing <= 0 else missing / self.limit.per_second

    def charge(self, peer: str) -> None:
        """A refused call of an unauthenticated ``peer`` spends one token."""
        tokens = max(0.0, self._tokens(peer) - 1.0)
        self._buckets[peer] = (tokens, self._clock())
        self._buckets.move_to_end(peer)
        while len(self._buckets) > self.limit.max_peers:
            self._buckets.popitem(last=False)

    def __len__(self) -> int:
        return len(self._buckets)


@functools.cache
def _retry_info_types() -> tuple[Any, Any]:
    """google.rpc.Status and google.rpc.RetryInfo, the standard carriers of a retry delay,
    built in a private descriptor pool: the wire form is what clients decode, and this avoids
    a dependency on googleapis-common-protos for two small messages."""
    pool = descriptor_pool.DescriptorPool()
    for file in (AnyMessage.DESCRIPTOR.file, Duration.DESCRIPTOR.file):
        proto = descriptor_pb2.FileDescriptorProto()
        file.CopyToProto(proto)
        pool.Add(proto)
    rpc = descriptor_pb2.FileDescriptorProto(
        name="edgefleet/google_rpc_subset.proto",
        package="google.rpc",
        syntax="proto3",
        dependency=["google/protobuf/any.proto", "google/protobuf/duration.proto"],
    )
    status = rpc.message_type.add(name="Status")
    status.field.add(name="code", number=1, type=5, label=1)  # int32
    status.field.add(name="message", number=2, type=9, label=1)  # string
    status.field.add(name="details", number=3, type=11, label=3, type_name=".google.protobuf.Any")
    retry = rpc.message_type.add(name="RetryInfo")
    retry.field.add(name="retry_delay", number=1, type=11, label=1, type_name=".google.protobuf.Duration")
    pool.Add(rpc)
    return (
        message_factory.GetMessageClass(pool.FindMessageTypeByName("google.rpc.Status")),
        message_factory.GetMessageClass(pool.FindMessageTypeByName("google.rpc.RetryInfo")),
    )


def retry_metadata(code: int, message: str, delay: float) -> tuple[tuple[str, str | bytes], ...]:
    """Trailing metadata saying when to retry: google.rpc.RetryInfo in the standard
    grpc-status-details-bin, and ``retry-after`` in whole seconds for plain clients."""
    status_type, retry_type = _retry_info_types()
    seconds = max(1, int(delay + 0.999))
    retry = retry_type()
    retry.retry_delay.FromSeconds(seconds)
    status = status_type(code=code, message=message)
    detail = status.details.add()
    detail.type_url = "type.googleapis.com/google.rpc.RetryInfo"
    detail.value = retry.SerializeToString()
    return ((STATUS_DETAILS_KEY, status.SerializeToString()), (RETRY_AFTER_KEY, str(seconds)))
