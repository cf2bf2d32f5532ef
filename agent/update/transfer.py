"""Bytes of an artifact from the control plane: one ``FetchArtifact`` stream, whole or a range,
with its failures sorted into the two error families, and the counters of what a device moved.

The counters are the device's own account of a download (what crossed the network, what it
copied from artifacts it already held, what it had to fetch again), so the updater and
telemetry can report what delta transfers save without anyone re-measuring it.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from dataclasses import dataclass

import grpc

from edgefleet.agent.update.errors import ArtifactUnavailable, ControlPlaneUnavailable
from edgefleet.protos.fleet.release import ArtifactInfo, ArtifactLengthMismatch
from edgefleet.protos.fleet.v1 import device_pb2, device_pb2_grpc

TRANSIENT_CODES = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.ABORTED,
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.UNKNOWN,
    }
)


class SourceLengthMismatch(ArtifactLengthMismatch):
    """The control plane serves the artifact with a length other than the signed one: every
    byte it could send would fail verification, so the download is refused, not retried."""


@dataclass(slots=True)
class TransferCounters:
    """What this store's downloads moved, in bytes and chunks, since the agent started.

    ``fetched_bytes`` counts artifact bytes received from the control plane (whole-file and
    ranged fetches alike); ``copied_bytes`` the bytes of chunks copied, verified, from artifacts
    already on the device; ``refetched_chunks`` local chunks whose bytes no longer matched their
    hash and were fetched instead; ``mirror_bytes`` artifact bytes received from HTTP mirrors
    (:mod:`.sources`) and ``mirror_refusals`` how often a mirror was refused for wrong bytes."""

    fetched_bytes: int = 0
    copied_bytes: int = 0
    refetched_chunks: int = 0
    mirror_bytes: int = 0
    mirror_refusals: int = 0


def rpc_failure(exc: grpc.aio.AioRpcError, info: ArtifactInfo, offset: int) -> Exception:
    """A failed ``FetchArtifact`` as the error family it belongs to."""
    if exc.code() == grpc.StatusCode.OUT_OF_RANGE:
        # What we asked for (never past the signed length) is past the end of their copy.
        return SourceLengthMismatch(
            f"the control plane's copy of artifact {info.path!r} ({info.sha256[:12]}) is shorter "
            f"than the signed {info.length} bytes (asked from byte {offset})"
        )
    if exc.code() in TRANSIENT_CODES:
        return ControlPlaneUnavailable(f"artifact download interrupted: {exc.details()}")
    return ArtifactUnavailable(f"artifact {info.sha256}: {exc.code().name}: {exc.details()}")


def check_served_length(chunk: device_pb2.ArtifactChunk, info: ArtifactInfo) -> None:
    if chunk.total_length and chunk.total_length != info.length:
        raise SourceLengthMismatch(
            f"the control plane serves artifact {info.path!r} ({info.sha256[:12]}) with "
            f"{chunk.total_length} bytes, its signed length is {info.length}"
        )


async def fetch_range(
    stub: device_pb2_grpc.DeviceServiceStub,
    info: ArtifactInfo,
    offset: int,
    length: int,
    counters: TransferCounters,
) -> AsyncGenerator[bytes, None]:
    """The bytes ``[offset, offset + length)`` of the artifact, in the pieces they arrive in.

    Asks for the range (``length``); a control plane that predates ranges sends the rest of
    the artifact, so the stream is cut once the range is complete. Every byte received counts
    in ``counters.fetched_bytes``. A stream that ends early is transient (the caller resumes);
    pieces out of place, or a length other than the signed one, are refused."""
    request = device_pb2.FetchArtifactRequest(sha256=info.sha256, offset=offset, length=length)
    call = stub.FetchArtifact(request)
    position, end = offset, offset + length
    try:
        async for chunk in call:
            counters.fetched_bytes += len(chunk.data)
            check_served_length(chunk, info)
            if position >= end:
                break  # a control plane that ignores the length keeps sending: stop it here
            if chunk.offset != position:
                raise ControlPlaneUnavailable(f"artifact chunk at offset {chunk.offset}, expected {position}")
            data = chunk.data[: end - position]
            position += len(data)
            if data:
                yield data
    except grpc.aio.AioRpcError as exc:
        raise rpc_failure(exc, info, position) from exc
    finally:
        if isinstance(call, grpc.aio.Call):
            call.cancel()  # a no-op once the stream ended; stops an old control plane's overshoot
    if position < end:
        raise ControlPlaneUnavailable(f"artifact range ended at {position} of {end} bytes; resuming")


async def fetch_rest(
    stub: device_pb2_grpc.DeviceServiceStub,
    info: ArtifactInfo,
    offset: int,
    counters: TransferCounters,
) -> AsyncGenerator[bytes, None]:
    """The artifact from ``offset`` to the end of the control plane's copy, uncut: a whole-file
    download hands every byte to the verifier, which refuses one past the signed length
    (ArtifactTooLong) rather than letting an endless stream be trimmed into looking right."""
    request = device_pb2.FetchArtifactRequest(sha256=info.sha256, offset=offset)
    position = offset
    try:
        async for chunk in stub.FetchArtifact(request):
            counters.fetched_bytes += len(chunk.data)
            check_served_length(chunk, info)
            if chunk.offset != position:
                raise ControlPlaneUnavailable(f"artifact chunk at offset {chunk.offset}, expected {position}")
            position += len(chunk.data)
            yield chunk.data
    except grpc.aio.AioRpcError as exc:
        raise rpc_failure(exc, info, position) from exc
