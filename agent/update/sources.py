"""Where a download's bytes come from: each configured mirror in order, then the control plane.

One :class:`DownloadSources` serves one artifact download (all its attempts). A range is asked
of the first mirror still usable; when that mirror fails (down, an HTTP error, a stall, a body
cut short) the range goes on from the next source at the byte it reached, and the control plane
is the last source. A mirror that serves wrong bytes (a chunk whose hash differs from its
signed one, a length other than the signed one, or an assembled artifact that fails its hash)
is refused: a warning naming it, ``TransferCounters.mirror_refusals``, and it is skipped for the
rest of the download. Wrong bytes from the control plane stay a refusal of the artifact, as
before. A mirror that merely failed is skipped for the rest of one attempt only.

Every byte, whichever source, passes the store's token bucket (``max_download_rate``). The
caller still verifies the whole artifact against its signed length and hash before use.
"""

from __future__ import annotations

import hashlib
import logging
from collections import deque
from collections.abc import AsyncGenerator, Sequence
from contextlib import aclosing
from dataclasses import dataclass, field

import httpx

from edgefleet.agent.update.mirrors import MirrorFailed, MirrorRefused, MirrorSettings, mirror_range
from edgefleet.agent.update.transfer import TransferCounters, fetch_range, fetch_rest
from edgefleet.protos.fleet.chunking import Chunk
from edgefleet.protos.fleet.release import ArtifactHashMismatch, ArtifactInfo
from edgefleet.protos.fleet.v1 import device_pb2_grpc

log = logging.getLogger(__name__)

CONTROL_PLANE = "the control plane"


class ChunkHashMismatch(ArtifactHashMismatch):
    """Bytes the control plane served for a chunk do not hash to the chunk's signed sha256: the
    artifact's bytes are wrong, found before the whole file is."""


class _WrongChunk(Exception):
    """A chunk from one or more mirrors failed its hash; they are refused and it is fetched again."""

    def __init__(self, mirrors: set[str], reason: str) -> None:
        super().__init__(reason)
        self.mirrors, self.reason = mirrors, reason


@dataclass(slots=True)
class DownloadSources:
    """The sources of one artifact download (see the module docstring). ``client`` is None when
    no mirror is configured; ``contributors`` are the mirrors whose bytes went into the part file
    since ``forget_contributors``, so a whole file that fails its hash can be blamed on them."""

    stub: device_pb2_grpc.DeviceServiceStub
    info: ArtifactInfo
    counters: TransferCounters
    settings: MirrorSettings
    client: httpx.AsyncClient | None
    refused: set[str] = field(default_factory=set)
    failed: set[str] = field(default_factory=set)
    contributors: set[str] = field(default_factory=set)

    def new_attempt(self) -> None:
        """Mirrors that failed get another chance; refused ones do not."""
        self.failed.clear()

    def _next_mirror(self) -> str | None:
        if self.client is None:
            return None
        for mirror in self.settings.mirrors:
            if mirror not in self.refused and mirror not in self.failed:
                return mirror
        return None

    def refuse(self, mirror: str, reason: str) -> None:
        """Refuses ``mirror`` for the rest of this download, logged and counted."""
        if mirror in self.refused:
            return
        self.refused.add(mirror)
        self.counters.mirror_refusals += 1
        log.warning(
            "refusing mirror %s for artifact %s: %s; not asking it again during this download",
            mirror,
            self.info.sha256[:12],
            reason,
        )

    def refuse_contributors(self, reason: str) -> bool:
        """Refuses every mirror whose bytes are in the part file; True when there was one."""
        blamed = self.contributors - self.refused
        for mirror in sorted(blamed):
            self.refuse(mirror, reason)
        self.contributors.clear()
        return bool(blamed)

    def forget_contributors(self) -> None:
        self.contributors.clear()

    def _fail(self, exc: MirrorFailed) -> None:
        if isinstance(exc, MirrorRefused):
            self.refuse(exc.mirror, exc.reason)
            return
        self.failed.add(exc.mirror)
        log.warning("%s; going on from the next source", exc)

    async def _range(
        self, mirror: str | None, offset: int, end: int, *, uncut: bool = False
    ) -> AsyncGenerator[bytes, None]:
        """``[offset, end)`` from one source: ``mirror``, or the control plane when None (with
        ``uncut``, all it sends from ``offset``: see ``fetch_rest``)."""
        if mirror is None:
            limiter = self.settings.limiter
            if uncut:
                pieces = fetch_rest(self.stub, self.info, offset, self.counters)
            else:
                pieces = fetch_range(self.stub, self.info, offset, end - offset, self.counters)
            async with aclosing(pieces):
                async for data in pieces:
                    await limiter.take(len(data))
                    yield data
            return
        assert self.client is not None
        log.debug("artifact %s: bytes %d-%d from mirror %s", self.info.sha256[:12], offset, end - 1, mirror)
        pieces = mirror_range(self.client, mirror, self.info, offset, end, self.settings.limiter)
        async with aclosing(pieces):
            async for data in pieces:
                self.counters.mirror_bytes += len(data)
                self.contributors.add(mirror)
                yield data

    async def pieces(self, offset: int) -> AsyncGenerator[bytes, None]:
        """The bytes from ``offset`` to the artifact's end in order, each source taking over where
        the last stopped; unchecked (a whole-file download checks the artifact's length and hash:
        the control plane's part is passed on uncut, so bytes past the end reach the verifier)."""
        position, end = offset, self.info.length
        while position < end:
            mirror = self._next_mirror()
            try:
                async with aclosing(self._range(mirror, position, end, uncut=True)) as source:
                    async for data in source:
                        position += len(data)
                        yield data
            except MirrorFailed as exc:
                self._fail(exc)
            if mirror is None:
                return  # the control plane's range is complete, or it raised

    async def chunks(self, chunks: Sequence[Chunk]) -> AsyncGenerator[bytes, None]:
        """The bytes of the consecutive ``chunks``, one verified chunk at a time. A source that
        fails mid-chunk is followed by the next from the byte it reached; a chunk that fails its
        hash refuses the mirrors that served it and is fetched again from the next source, or is
        a ChunkHashMismatch when it came from the control plane alone."""
        pending = deque(chunks)
        buffer = bytearray()
        origins: set[str | None] = set()  # the sources of the bytes in ``buffer``
        while pending:
            mirror = self._next_mirror()
            start = pending[0].offset + len(buffer)
            try:
                async with aclosing(self._range(mirror, start, pending[-1].end)) as source:
                    async for data in source:
                        buffer += data
                        origins.add(mirror)
                        while pending and len(buffer) >= pending[0].length:
                            chunk = pending.popleft()
                            piece = bytes(buffer[: chunk.length])
                            del buffer[: chunk.length]
                            if hashlib.sha256(piece).hexdigest() != chunk.sha256:
                                pending.appendleft(chunk)
                                buffer.clear()
                                raise self._wrong_chunk(chunk, origins)
                            origins = {mirror} if buffer else set()
                            yield piece
            except MirrorFailed as exc:
                self._fail(exc)
            except _WrongChunk as exc:
                origins.clear()
                for blamed in sorted(exc.mirrors):
                    self.refuse(blamed, exc.reason)

    def _wrong_chunk(self, chunk: Chunk, origins: set[str | None]) -> Exception:
        mirrors = {m for m in origins if m is not None}
        reason = (
            f"artifact {self.info.path!r}: the bytes at {chunk.offset} do not hash to the chunk's "
            f"signed sha256 {chunk.sha256[:12]}"
        )
        if not mirrors:
            return ChunkHashMismatch(reason.replace("the bytes", f"{CONTROL_PLANE}'s bytes", 1))
        return _WrongChunk(mirrors, reason)
