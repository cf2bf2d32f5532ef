"""Verified artifact storage and resumable download over gRPC.

Layout under the state dir: ``downloads/<sha256>.part`` while bytes arrive, then
``artifacts/<sha256>`` (read-only) once length and hash matched the signed target info.
Nothing under ``artifacts/`` was ever unverified, so the runtime only ever sees checked bytes.

An artifact whose release signed a chunk list is assembled chunk by chunk instead
(:mod:`.delta_fetch`): what the device already holds in other artifacts is copied, the rest
fetched by range, and the chunk lists of stored artifacts are kept in ``artifacts-chunks/``
(:mod:`.chunk_index`) for the next release. Either way the part file is published only once
the whole artifact matched its signed length and hash.

Bytes come from the HTTP mirrors of the signed device config first, then the control plane
(:mod:`.sources`), all through one token bucket (``max_download_rate``).
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Callable, Iterable
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path

from tenacity import (
    AsyncRetrying,
    retry_if_exception_type,
    stop_after_attempt,
    wait_random_exponential,
)

from edgefleet.agent.update.chunk_index import ChunkIndex
from edgefleet.agent.update.delta_fetch import assemble
from edgefleet.agent.update.errors import (
    ControlPlaneUnavailable,
    InsufficientDisk,
    TransientFailure,
    typed_os_errors,
)
from edgefleet.agent.update.mirrors import MirrorSettings
from edgefleet.agent.update.sources import DownloadSources
from edgefleet.agent.update.transfer import TRANSIENT_CODES, SourceLengthMismatch, TransferCounters
from edgefleet.protos.fleet.fsio import fsync_dir
from edgefleet.protos.fleet.release import (
    ArtifactError,
    ArtifactHashMismatch,
    ArtifactInfo,
    ArtifactLengthMismatch,
    ArtifactVerifier,
)
from edgefleet.protos.fleet.v1 import device_pb2_grpc

log = logging.getLogger(__name__)

HASH_CHUNK = 1 << 20
DISK_HEADROOM_BYTES = 64 * 1024 * 1024
__all__ = ["TRANSIENT_CODES", "ArtifactStore", "SourceLengthMismatch", "TransferCounters"]

Progress = Callable[[int, int], None]


class EmptyArtifact(ArtifactError):
    """The signed target is 0 bytes long: no model fits in nothing, so it is refused before
    any download (a hash of no bytes would "verify" and leave nothing to load)."""


class MirrorBytesRefused(ControlPlaneUnavailable):
    """The assembled artifact failed its hash with bytes from a mirror in it: the mirrors are
    refused and the download starts again from the next source (a transient failure)."""


class InstalledArtifactMissing(ArtifactError):
    """An install record names an artifact that is no longer in the store (deleted by hand,
    or a disk that lost it)."""


class InstalledArtifactDamaged(ArtifactLengthMismatch):
    """An installed artifact's size differs from its record: the disk changed it after it was
    verified, so it is not the verified model any more."""


def check_signed_length(info: ArtifactInfo) -> None:
    """Refuses a target whose signed length no download can satisfy (EmptyArtifact)."""
    if info.length <= 0:
        raise EmptyArtifact(
            f"artifact {info.path!r} ({info.sha256[:12]}) is signed with length {info.length}: "
            "an empty model file cannot be installed"
        )


@dataclass(frozen=True, slots=True)
class ArtifactStore:
    artifact_dir: Path
    download_dir: Path
    unpacked_dir: Path | None = None  # folder variants (ONNX, MLX), extracted per artifact
    index_dir: Path | None = None  # chunk lists of stored artifacts; default: beside artifact_dir
    counters: TransferCounters = field(default_factory=TransferCounters, compare=False)
    mirrors: MirrorSettings = field(default_factory=MirrorSettings, compare=False)

    @property
    def chunk_index(self) -> ChunkIndex:
        index_dir = self.index_dir or self.artifact_dir.with_name(f"{self.artifact_dir.name}-chunks")
        return ChunkIndex(index_dir, self.artifact_dir)

    def path(self, sha256: str) -> Path:
        return self.artifact_dir / sha256

    def has(self, sha256: str) -> bool:
        return self.path(sha256).is_file()

    def installed(self, sha256: str, length: int, *, what: str) -> Path:
        """The stored artifact ``sha256`` of ``what`` (a model id, for messages), after checking
        it is still there with its recorded ``length``; its hash was checked when it entered the
        store, its size is re-checked here so a large model starts fast."""
        path = self.path(sha256)
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            raise InstalledArtifactMissing(
                f"the artifact of {what} ({sha256[:12]}) is missing from {path.parent}"
            ) from None
        if size != length:
            raise InstalledArtifactDamaged(
                f"the stored artifact of {what} ({sha256[:12]}) has {size} bytes, {length} were verified"
            )
        return path

    def part_path(self, sha256: str) -> Path:
        return self.download_dir / f"{sha256}.part"

    def collect_garbage(self, keep: Iterable[str], *, keep_partial: bool = False) -> list[str]:
        """Removes verified artifacts, their extracted folders and partial downloads not in
        ``keep``; returns what it removed.

        ``keep_partial`` spares every partial download: at boot the pending deployment is not
        verified yet, and its partial download must survive to resume. Extractions a crash
        interrupted (``.<sha256>.*.extracting``) always go.
        """
        wanted = set(keep)
        removed = []
        places = [(self.artifact_dir, ""), (self.chunk_index.index_dir, ".json")]
        places += [] if keep_partial else [(self.download_dir, ".part")]
        if self.unpacked_dir is not None:
            places.append((self.unpacked_dir, ""))
        for directory, suffix in places:
            if not directory.is_dir():
                continue
            for entry in directory.iterdir():
                digest = entry.name.removesuffix(suffix) if suffix else entry.name
                if digest in wanted:
                    continue
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry, ignore_errors=True)
                else:
                    entry.unlink(missing_ok=True)
                removed.append(entry.name)
        return removed

    def _regular_part(self, info: ArtifactInfo) -> Path:
        """The part file's path, after removing whatever else was planted there."""
        part = self.part_path(info.sha256)
        if part.is_symlink() or (part.exists() and not part.is_file()):
            # Never follow a link or write into a device planted where a download goes.
            log.warning("removing %s: not a regular file", part)
            part.unlink()
        return part

    def _resume(self, info: ArtifactInfo) -> tuple[ArtifactVerifier, int]:
        """Re-hashes a partial download so it continues where it stopped."""
        part = self._regular_part(info)
        verifier = ArtifactVerifier(info)
        if not part.exists():
            return verifier, 0
        if part.stat().st_size > info.length:
            part.unlink()
            return verifier, 0
        with part.open("rb") as f:
            while chunk := f.read(HASH_CHUNK):
                verifier.update(chunk)
        log.info("resuming download of %s at byte %d of %d", info.sha256[:12], verifier.received, info.length)
        return verifier, verifier.received

    def _check_disk(self, needed: int) -> None:
        free = shutil.disk_usage(self.download_dir).free
        if free < needed + DISK_HEADROOM_BYTES:
            raise InsufficientDisk(
                f"need {needed + DISK_HEADROOM_BYTES} bytes free in {self.download_dir}, have {free}"
            )

    async def fetch(
        self,
        stub: device_pb2_grpc.DeviceServiceStub,
        info: ArtifactInfo,
        *,
        progress: Progress | None = None,
        attempts: int = 6,
    ) -> Path:
        """Downloads and verifies an artifact, resuming after dropped connections; returns its path.

        Refused with a typed ArtifactError (never retried): a signed length of 0, a source
        serving another length, bytes beyond the signed length, a hash mismatch. A transient
        failure (a dropped stream, a disk full or busy for a moment: DiskBusy) is retried
        ``attempts`` times in all, then raised; another local I/O error is a DiskRefused."""
        check_signed_length(info)
        if self.has(info.sha256):
            stored = self.path(info.sha256)
            if stored.stat().st_size == info.length:
                with typed_os_errors():
                    self._index(info)
                return stored
            log.warning("stored artifact %s has the wrong size; downloading it again", info.sha256[:12])
            stored.unlink()
        self.download_dir.mkdir(parents=True, exist_ok=True)
        self.artifact_dir.mkdir(parents=True, exist_ok=True)
        counters = self.counters
        fetched, copied, mirrored = counters.fetched_bytes, counters.copied_bytes, counters.mirror_bytes
        async with AsyncExitStack() as stack:
            client = await stack.enter_async_context(self.mirrors.client()) if self.mirrors.mirrors else None
            sources = DownloadSources(stub, info, counters, self.mirrors, client)
            async for attempt in AsyncRetrying(
                retry=retry_if_exception_type(TransientFailure),
                wait=wait_random_exponential(multiplier=0.5, max=10),
                stop=stop_after_attempt(attempts),
                reraise=True,
            ):
                with attempt, typed_os_errors():
                    sources.new_attempt()
                    await self._download_once(sources, info, progress=progress)
        with typed_os_errors():
            published = self._publish(info)
        log.info(
            "artifact %s verified: %d bytes fetched from the control plane, %d from mirrors, "
            "%d copied from artifacts already here, of %d",
            info.sha256[:12],
            counters.fetched_bytes - fetched,
            counters.mirror_bytes - mirrored,
            counters.copied_bytes - copied,
            info.length,
        )
        return published

    async def _download_once(
        self,
        sources: DownloadSources,
        info: ArtifactInfo,
        *,
        progress: Progress | None,
    ) -> None:
        if info.chunks is not None:
            await self._assemble_once(sources, info, progress=progress)
            return
        verifier, offset = self._resume(info)
        if offset == 0:
            sources.forget_contributors()
        self._check_disk(info.length - offset)
        part = self.part_path(info.sha256)
        if offset < info.length:
            await self._stream_into(sources, part, info, verifier, progress=progress)
        if verifier.received < info.length:
            raise ControlPlaneUnavailable(
                f"artifact stream ended at {verifier.received} of {info.length} bytes; resuming"
            )
        self._finish(sources, part, verifier)

    @staticmethod
    def _finish(sources: DownloadSources, part: Path, verifier: ArtifactVerifier) -> None:
        """Checks the whole artifact's hash; wrong bytes are removed, so the next attempt starts
        clean, and when a mirror served any of them it is refused and the download goes on
        (MirrorBytesRefused) without it."""
        try:
            verifier.finish()
        except ArtifactHashMismatch as exc:
            part.unlink(missing_ok=True)
            if sources.refuse_contributors(f"the assembled artifact does not verify: {exc}"):
                raise MirrorBytesRefused(f"refused a mirror's bytes of {part.name}; fetching again") from exc
            raise

    async def _assemble_once(
        self,
        sources: DownloadSources,
        info: ArtifactInfo,
        *,
        progress: Progress | None,
    ) -> None:
        """One attempt at a chunked download (see :mod:`.delta_fetch`)."""
        part = self._regular_part(info)
        self._check_disk(info.length - (part.stat().st_size if part.exists() else 0))
        verifier = ArtifactVerifier(info)
        held = self.chunk_index.held(exclude=info.sha256)
        await assemble(sources, info, part, verifier, held=held, counters=self.counters, progress=progress)
        if verifier.received < info.length:
            raise ControlPlaneUnavailable(f"artifact assembled to {verifier.received} of {info.length} bytes")
        self._finish(sources, part, verifier)  # every chunk matched: a list the hash disagrees with

    async def _stream_into(
        self,
        sources: DownloadSources,
        part: Path,
        info: ArtifactInfo,
        verifier: ArtifactVerifier,
        *,
        progress: Progress | None,
    ) -> None:
        fd = os.open(part, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "ab") as out:
            try:
                async for data in sources.pieces(verifier.received):
                    verifier.update(data)  # raises before writing past the signed length
                    out.write(data)
                    if progress is not None:
                        progress(verifier.received, info.length)
            finally:
                out.flush()
                os.fsync(out.fileno())

    def _publish(self, info: ArtifactInfo) -> Path:
        part = self.part_path(info.sha256)
        final = self.path(info.sha256)
        os.chmod(part, 0o444)
        os.replace(part, final)
        fsync_dir(final.parent)
        self._index(info)
        return final

    def _index(self, info: ArtifactInfo) -> None:
        """Keeps a stored artifact's signed chunk list for the releases after it."""
        if info.chunks is not None and not self.chunk_index.has(info.sha256):
            self.chunk_index.record(info.sha256, info.chunks)
