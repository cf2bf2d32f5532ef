"""Content-addressed chunk lists of model artifacts, for delta transfers.

A release describes each artifact as an ordered list of chunks (offset, length, sha256) that
covers the file exactly. A device that already holds some of those chunks (from an earlier
release, or another quantization of the same model) fetches only the others and checks each
against its hash; the signed chunk list, not the chunker, is what a device trusts, so the
boundaries only decide how much is shared, never whether an artifact verifies.

Two strategies, one table (:data:`STRATEGIES`):

* ``cdc``: content-defined chunking, FastCDC 2020 through ``pyfastcdc`` (a port of the Rust
  ``fastcdc`` crate's v2020 module, so the same parameters cut the same boundaries in either
  language). Works on any file; a local edit moves only the boundaries next to it.
* ``gguf-tensors`` (:mod:`.chunking_gguf`): the GGUF header (metadata and tensor table) as the
  first chunk(s), then each tensor's data as one chunk, split at a fixed size when larger.
  Works on GGUF files only.

Which to use, measured by ``python -m bench.chunk_dedupe`` (full run) on SmolLM2-135M-Instruct
requantized by the ladder; byte counts, so the same on any machine. *Across the quantization
ladder* the two strategies share the same bytes, and little: q4_0 + q5_1 + q8_0 are 348.2 MB,
their distinct chunks 285.1 MB with CDC (64 KiB average) and 285.6 MB tensor-aligned (1 MiB
pieces), and a device holding q4_0 fetches 0.718 (CDC) / 0.720 (tensors) of q5_1 and 0.782 /
0.784 of q8_0. What is shared is token_embd.weight, which llama.cpp leaves at q8_0 in every rung
(30 MB), the F32 norms and the first MiB of the header (the tokenizer); the same weights
quantized to different types share no bytes, so no chunking can do much better. CDC's lead (0.55
MB fewer distinct bytes) is the header: it shares 1.66 of its 1.79 MB between two rungs, cutting
around the few bytes that differ, where tensor pieces share 1 MiB. *Across versions* tensor-
aligned chunks fetch exactly the retrained tensors: 0.1088 of the file when whole middle blocks
changed (10.88% of the bytes) and 0.1017 when attn_q/k/v of every block changed (10.17%). CDC
comes close for the contiguous change (0.1092 at 64 KiB, 0.1125 at 256 KiB, 0.154 at 1 MiB) but
fetches 1.8x to 5.9x the changed bytes for the spread one (0.186, 0.328, 0.602), since every
changed region drags in the unchanged ends of the chunks around it. Only tensor-aligned chunks
meet the 0.15 target for both shapes, so GGUF artifacts should be cut by tensor, with 1 MiB
pieces (302 chunks for the 92 MB q4_0; 4 MiB pieces keep the header whole and lose its shared
MiB per rung); CDC at 64 KiB average is for every other artifact (ONNX, MLX, archives). The
price: GGUFReader's Python parse of a 1.8 MB header takes ~3 s a file, where CDC with sha256
cuts a 92 MB file in ~0.1 s.

Chunking reads the file front to back in bounded pieces (memory stays a few times the largest
chunk whatever the file's size), and every input is bounded: chunk counts by
:class:`ChunkLimits`, GGUF counts before the file is parsed. ``pyfastcdc`` and ``gguf`` are
imported only when their strategy runs, so the agent can import this module (the types, the
coverage check and :func:`missing_chunks`) without either installed.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from types import MappingProxyType
from typing import BinaryIO

from edgefleet.protos.fleet.release import Refusal, ReleaseError, TransientFailure

KIB = 1024
MIB = 1024 * KIB
READ_BYTES = 1 * MIB  # one read while hashing fixed boundaries
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")


class ChunkingError(Exception):
    """Base of the chunker's errors; each is also a :class:`Refusal` or a :class:`TransientFailure`."""


class UnreadableArtifact(ChunkingError, TransientFailure):
    """The file could not be opened or read (missing, permissions, an I/O error)."""


class MalformedArtifact(ChunkingError, Refusal):
    """The file is not what the strategy needs (not a GGUF file, a truncated or corrupt one)."""


class TooManyChunks(ChunkingError, Refusal):
    """The file would need more chunks than :class:`ChunkLimits` allows."""


class MalformedChunkList(ChunkingError, ReleaseError):
    """A chunk list that does not cover its artifact exactly, once, in order, within limits: a
    release refusal, since a signed chunk list is part of what a release promises."""


class ChunkingUnavailable(ChunkingError, Refusal):
    """The strategy's library (``pyfastcdc`` or ``gguf``) is missing: install edgefleet[controlplane]."""


class InvalidChunkParameters(ChunkingError, Refusal):
    """Chunk sizes out of range or out of order."""


@dataclass(frozen=True, slots=True)
class Chunk:
    """One piece of an artifact: bytes ``[offset, offset + length)`` whose sha256 is ``sha256`` (hex)."""

    offset: int
    length: int
    sha256: str

    @property
    def end(self) -> int:
        return self.offset + self.length


@dataclass(frozen=True, slots=True)
class ChunkLimits:
    """Bounds on one artifact's chunk list, in chunks and bytes.

    ``max_chunks`` keeps a release's signed metadata and a device's bookkeeping bounded (a chunk
    is about 100 bytes of metadata: 65,536 chunks are ~6.5 MB); ``max_chunk_bytes`` bounds what a
    device buffers to check one chunk's hash.
    """

    max_chunks: int = 65_536
    max_chunk_bytes: int = 16 * MIB


@dataclass(frozen=True, slots=True)
class CdcParams:
    """FastCDC sizes in bytes. pyfastcdc's mean chunk comes out near ``avg + min``.

    The defaults (16 KiB / 64 KiB / 256 KiB), from ``bench.chunk_dedupe``: quantized weights are
    high-entropy bytes whose shared or changed runs are whole tensors, so what decides is the
    unchanged bytes a changed region drags in at its edges. For a release that retrained
    attn_q/k/v in every block (many regions of 60-190 KB) a device fetched 1.8x the changed
    bytes at 64 KiB average, 3.2x at 256 KiB and 5.9x at 1 MiB, while across the quantization
    ladder all three shared the same. The cost is chunk count: ~1,200 for a 92 MB model
    (~120 KB of release metadata), still far under :class:`ChunkLimits`.
    """

    min_size: int = 16 * KIB
    avg_size: int = 64 * KIB
    max_size: int = 256 * KIB

    def check(self, limits: ChunkLimits) -> None:
        # pyfastcdc's own bounds, checked here so a bad value is a typed error, not a ValueError.
        if not (64 <= self.min_size <= MIB and 256 <= self.avg_size <= 4 * MIB and self.max_size >= KIB):
            raise InvalidChunkParameters(f"CDC sizes out of range: {self}")
        if not (self.min_size <= self.avg_size <= self.max_size <= min(16 * MIB, limits.max_chunk_bytes)):
            raise InvalidChunkParameters(f"CDC sizes must be min <= avg <= max <= the chunk limit: {self}")


class Strategy(StrEnum):
    """How an artifact is cut; the value is what a release would name."""

    CDC = "cdc"
    GGUF_TENSORS = "gguf-tensors"


def open_artifact(path: Path) -> BinaryIO:
    """Opens ``path`` for reading, as :class:`UnreadableArtifact` when it cannot be."""
    try:
        return path.open("rb")
    except OSError as exc:
        raise UnreadableArtifact(f"cannot open {path}: {exc}") from exc


def _counted(chunks: Iterable[Chunk], path: Path, limits: ChunkLimits) -> Iterator[Chunk]:
    """Passes chunks through, refusing the one past ``limits.max_chunks`` before it is kept."""
    for count, chunk in enumerate(chunks, start=1):
        if count > limits.max_chunks:
            raise TooManyChunks(f"{path} needs more than {limits.max_chunks} chunks")
        yield chunk


def chunk_cdc(
    path: Path, *, params: CdcParams | None = None, limits: ChunkLimits | None = None
) -> list[Chunk]:
    """The FastCDC chunk list of ``path``, streamed: memory stays about twice ``params.max_size``."""
    params = params or CdcParams()
    limits = limits or ChunkLimits()
    params.check(limits)
    try:
        from pyfastcdc import FastCDC
    except ImportError as exc:
        raise ChunkingUnavailable("pyfastcdc is not installed (install edgefleet[controlplane])") from exc
    # normalized_chunking and seed are pinned: they are part of where the boundaries fall.
    cutter = FastCDC(
        params.avg_size,
        min_size=params.min_size,
        max_size=params.max_size,
        normalized_chunking=1,
        seed=0,
    )

    def cut(stream: BinaryIO) -> Iterator[Chunk]:
        for piece in cutter.cut_stream(stream):
            # piece.data is valid only until the next piece is cut: hash it now.
            yield Chunk(piece.offset, piece.length, hashlib.sha256(piece.data).hexdigest())

    with open_artifact(path) as stream:
        try:
            return list(_counted(cut(stream), path, limits))
        except OSError as exc:
            raise UnreadableArtifact(f"cannot read {path}: {exc}") from exc


def hash_spans(path: Path, spans: Sequence[tuple[int, int]], limits: ChunkLimits) -> list[Chunk]:
    """Hashes consecutive ``(offset, length)`` spans of ``path`` that cover it exactly, reading
    front to back in pieces of at most :data:`READ_BYTES`."""
    if len(spans) > limits.max_chunks:
        raise TooManyChunks(f"{path} needs {len(spans)} chunks, more than {limits.max_chunks}")
    chunks: list[Chunk] = []
    with open_artifact(path) as stream:
        try:
            for offset, length in spans:
                digest = hashlib.sha256()
                left = length
                while left:
                    data = stream.read(min(left, READ_BYTES))
                    if not data:
                        raise MalformedArtifact(f"{path} ends inside the chunk at {offset}")
                    digest.update(data)
                    left -= len(data)
                chunks.append(Chunk(offset, length, digest.hexdigest()))
            if stream.read(1):
                raise MalformedArtifact(f"{path} grew while it was chunked")
        except OSError as exc:
            raise UnreadableArtifact(f"cannot read {path}: {exc}") from exc
    return chunks


def check_chunk_list(chunks: Sequence[Chunk], length: int, limits: ChunkLimits | None = None) -> None:
    """Pure: ``chunks`` covers ``[0, length)`` exactly, in order, within ``limits``, with
    well-formed hashes; raises :class:`MalformedChunkList` otherwise. Both sides use it: the
    control plane before it signs a list, a device before it plans a fetch from one."""
    limits = limits or ChunkLimits()
    if len(chunks) > limits.max_chunks:
        raise MalformedChunkList(f"{len(chunks)} chunks, more than {limits.max_chunks}")
    if length < 0 or (length == 0) != (not chunks):
        raise MalformedChunkList(f"a {length}-byte artifact cannot have {len(chunks)} chunks")
    position = 0
    for index, chunk in enumerate(chunks):
        if chunk.offset != position:
            raise MalformedChunkList(f"chunk {index} starts at {chunk.offset}, expected {position}")
        if not 0 < chunk.length <= limits.max_chunk_bytes:
            raise MalformedChunkList(f"chunk {index} is {chunk.length} bytes")
        if not _SHA256_HEX.fullmatch(chunk.sha256):
            raise MalformedChunkList(f"chunk {index} has no lowercase hex sha256")
        position = chunk.end
    if position != length:
        raise MalformedChunkList(f"chunks cover {position} bytes of a {length}-byte artifact")


def missing_chunks(held: Iterable[Chunk], wanted: Sequence[Chunk]) -> list[Chunk]:
    """The chunks of ``wanted`` to fetch when the chunks in ``held`` are already on the device:
    those whose hash is not held, each hash once (a repeated chunk is fetched once and copied)."""
    have = {chunk.sha256 for chunk in held}
    fetch: list[Chunk] = []
    for chunk in wanted:
        if chunk.sha256 not in have:
            have.add(chunk.sha256)
            fetch.append(chunk)
    return fetch


def chunk_gguf_tensors(path: Path, *, limits: ChunkLimits | None = None) -> list[Chunk]:
    """The tensor-aligned chunk list of a GGUF file (see :mod:`.chunking_gguf`)."""
    from edgefleet.protos.fleet.chunking_gguf import tensor_spans

    limits = limits or ChunkLimits()
    return hash_spans(path, tensor_spans(path, limits), limits)


def _cdc(path: Path, limits: ChunkLimits) -> list[Chunk]:
    return chunk_cdc(path, limits=limits)


def _gguf(path: Path, limits: ChunkLimits) -> list[Chunk]:
    return chunk_gguf_tensors(path, limits=limits)


STRATEGIES: MappingProxyType[Strategy, Callable[[Path, ChunkLimits], list[Chunk]]] = MappingProxyType(
    {Strategy.CDC: _cdc, Strategy.GGUF_TENSORS: _gguf}
)


def chunk_file(path: Path, strategy: Strategy, *, limits: ChunkLimits | None = None) -> list[Chunk]:
    """The chunk list of ``path`` cut by ``strategy`` with its default sizes."""
    return STRATEGIES[strategy](path, limits or ChunkLimits())
