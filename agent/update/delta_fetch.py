"""Assembles an artifact from its signed chunk list: chunks the device holds are copied from
its own files, the rest fetched by range from the download's sources (:mod:`.sources`: HTTP
mirrors, then the control plane), all into the part file, front to back (the plan:
:mod:`.delta_plan`).

Every chunk is hashed before it is written. A copied chunk whose bytes no longer match (the
held file changed, the index was wrong) is refused as :class:`HeldChunkMismatch`, logged,
counted and fetched instead; a fetched chunk that does not match refuses the mirror that served
it, or is :class:`ChunkHashMismatch`, a refusal, when the control plane's bytes disagree with
the signed list.
Whatever is written also feeds the whole-artifact verifier, so the caller still checks the
signed length and hash of the assembled file exactly as for a whole-file download.

An interrupted download resumes at chunk granularity: :func:`verified_prefix` re-hashes the
chunks the part file holds, keeps those that match and cuts the file after the last of them,
so what was written and verified is neither fetched nor copied again.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable, Sequence
from contextlib import aclosing
from pathlib import Path
from typing import BinaryIO

from edgefleet.agent.update.delta_plan import Copy, Fetch, HeldChunk, Plan, plan_chunks
from edgefleet.agent.update.sources import ChunkHashMismatch, DownloadSources
from edgefleet.agent.update.transfer import TransferCounters
from edgefleet.protos.fleet.chunking import Chunk
from edgefleet.protos.fleet.release import ArtifactError, ArtifactInfo, ArtifactVerifier

log = logging.getLogger(__name__)

Progress = Callable[[int, int], None]


__all__ = ["ChunkHashMismatch", "HeldChunkMismatch", "assemble", "read_held", "verified_prefix"]


class HeldChunkMismatch(ArtifactError):
    """Bytes read from the device's own files for a chunk do not hash to its signed sha256;
    never reported: the chunk is fetched from the control plane instead."""


def _read_exactly(stream: BinaryIO, length: int) -> bytes:
    data = stream.read(length)
    return data if len(data) == length else b""


def verified_prefix(part: Path, chunks: Sequence[Chunk], verifier: ArtifactVerifier) -> int | None:
    """How many leading ``chunks`` the part file holds with matching hashes (their bytes are
    fed to ``verifier``), None when there is no part file; the file is cut after them, so a torn
    or wrong chunk is written again."""
    if not part.is_file():
        return None
    size = part.stat().st_size
    done = 0
    with part.open("r+b") as stream:
        for chunk in chunks:
            if chunk.end > size:
                break
            data = _read_exactly(stream, chunk.length)
            if hashlib.sha256(data).hexdigest() != chunk.sha256:
                break
            verifier.update(data)
            done += 1
        keep = chunks[done - 1].end if done else 0
        if keep != size:
            stream.truncate(keep)
    return done


def read_held(source: HeldChunk, part: Path, chunk: Chunk) -> bytes:
    """The bytes ``source`` holds for ``chunk``, checked against its hash (HeldChunkMismatch)."""
    path = source.path or part
    try:
        with path.open("rb") as stream:
            stream.seek(source.offset)
            data = _read_exactly(stream, chunk.length)
    except OSError as exc:
        raise HeldChunkMismatch(f"cannot read chunk {chunk.sha256[:12]} from {path}: {exc}") from exc
    if hashlib.sha256(data).hexdigest() != chunk.sha256:
        raise HeldChunkMismatch(f"{path} no longer holds chunk {chunk.sha256[:12]} at {source.offset}")
    return data


class ChunkAssembler:
    """One attempt at assembling ``info`` into ``part`` (see the module docstring)."""

    def __init__(
        self,
        sources: DownloadSources,
        info: ArtifactInfo,
        part: Path,
        verifier: ArtifactVerifier,
        counters: TransferCounters,
        progress: Progress | None,
    ) -> None:
        self.sources, self.info, self.part = sources, info, part
        self.verifier, self.counters, self.progress = verifier, counters, progress

    async def run(self, plan: Plan, out: BinaryIO) -> None:
        for step in plan.steps:
            if isinstance(step, Copy):
                try:
                    data = read_held(step.source, self.part, step.chunk)
                except HeldChunkMismatch as exc:
                    log.warning("%s; fetching it instead", exc)
                    self.counters.refetched_chunks += 1
                    await self._fetch(Fetch((step.chunk,)), out)
                    continue
                self.counters.copied_bytes += len(data)
                self._write(out, data)
            else:
                await self._fetch(step, out)

    async def _fetch(self, step: Fetch, out: BinaryIO) -> None:
        pieces = self.sources.chunks(step.chunks)  # each chunk checked against its signed hash
        async with aclosing(pieces):  # a refusal mid-range ends the call now, not at collection
            async for data in pieces:
                self._write(out, data)

    def _write(self, out: BinaryIO, data: bytes) -> None:
        self.verifier.update(data)  # raises before writing past the signed length
        out.write(data)
        out.flush()  # a copy from the part file itself reads what was written
        if self.progress is not None:
            self.progress(self.verifier.received, self.info.length)


async def assemble(
    sources: DownloadSources,
    info: ArtifactInfo,
    part: Path,
    verifier: ArtifactVerifier,
    *,
    held: dict[str, HeldChunk],
    counters: TransferCounters,
    progress: Progress | None = None,
) -> Plan:
    """Resumes or starts assembling ``info`` (which has a chunk list) into ``part``, fsynced;
    returns the plan it carried out. The caller checks ``verifier`` is complete and finishes it."""
    assert info.chunks is not None
    chunks = info.chunks.chunks
    done = verified_prefix(part, chunks, verifier)
    if done is not None:  # the same line as a whole-file resume: where the verified bytes end
        log.info("resuming download of %s at byte %d of %d", info.sha256[:12], verifier.received, info.length)
    plan = plan_chunks(chunks, held, done=done or 0)
    log.info(
        "artifact %s: %d of %d chunks to assemble, %d bytes to fetch, %d to copy",
        info.sha256[:12],
        len(chunks) - plan.done,
        len(chunks),
        plan.fetch_bytes,
        plan.copy_bytes,
    )
    fd = os.open(part, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "ab") as out:
        try:
            await ChunkAssembler(sources, info, part, verifier, counters, progress).run(plan, out)
        finally:
            out.flush()
            os.fsync(out.fileno())
    return plan
