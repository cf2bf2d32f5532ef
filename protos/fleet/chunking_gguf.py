"""Where a GGUF file's tensor-aligned chunks fall: the header, then each tensor's data.

A GGUF file is a header (magic, version, counts, the key/value metadata, the tensor table)
padded to the file's alignment, then every tensor's data at its aligned offset. The spans
here follow that layout: the header as the first chunk, each tensor's data (with the
alignment padding after it) as the next one, and anything longer than ``piece_bytes`` cut
into fixed pieces. Two releases that carry a tensor with the same bytes at an offset with
the same alignment then share that tensor's chunks wherever it sits in either file.

The offsets come from ``gguf.GGUFReader`` (llama.cpp's own Python reader), which maps the
file rather than reading it. Before the reader runs, the fixed 24-byte preamble is checked
here: the magic, and tensor and key counts bounded by :class:`.chunking.ChunkLimits` and by
the file's size, so a hostile header cannot make the reader loop for long. Every way the
reader fails on a truncated or corrupt file becomes :class:`.chunking.MalformedArtifact`.
"""

from __future__ import annotations

import struct
from pathlib import Path

from edgefleet.protos.fleet.chunking import (
    MIB,
    ChunkingUnavailable,
    ChunkLimits,
    InvalidChunkParameters,
    MalformedArtifact,
    TooManyChunks,
    UnreadableArtifact,
    open_artifact,
)

GGUF_MAGIC = b"GGUF"
PREAMBLE = struct.Struct("<4sIQQ")  # magic, version, tensor count, key/value count
PIECE_BYTES = 1 * MIB
# The smallest tensor-table entry (a 1-byte name, one dimension) and key/value entry
# (a 1-byte key, a 1-byte value): bounds on the counts a file of a given size can hold.
_MIN_TENSOR_INFO_BYTES = 8 + 1 + 4 + 8 + 4 + 8
_MIN_KV_BYTES = 8 + 1 + 4 + 1

# What GGUFReader raises on malformed input: it indexes a memory map past its end, reshapes
# short arrays, looks up unknown type ids and decodes names.
_READER_ERRORS = (ValueError, IndexError, KeyError, OverflowError, TypeError, struct.error)


def _check_preamble(path: Path, limits: ChunkLimits) -> int:
    """Checks the magic and the counts; returns the file's size."""
    with open_artifact(path) as stream:
        try:
            head = stream.read(PREAMBLE.size)
            size = stream.seek(0, 2)
        except OSError as exc:
            raise UnreadableArtifact(f"cannot read {path}: {exc}") from exc
    if head[:4] != GGUF_MAGIC:
        raise MalformedArtifact(f"{path} is not a GGUF file")
    if len(head) < PREAMBLE.size:
        raise MalformedArtifact(f"{path} is truncated inside the GGUF preamble")
    _, version, n_tensors, n_kv = PREAMBLE.unpack(head)
    if version & 0xFFFF == 0:  # a big-endian file: the counts are byte-swapped too
        n_tensors, n_kv = struct.unpack(">QQ", head[8:])
    if n_tensors + 1 > limits.max_chunks:
        raise TooManyChunks(f"{path} declares {n_tensors} tensors, more than the chunk limit allows")
    if n_tensors * _MIN_TENSOR_INFO_BYTES + n_kv * _MIN_KV_BYTES > size:
        raise MalformedArtifact(f"{path} declares {n_tensors} tensors and {n_kv} keys, more than it can hold")
    return size


def _tensor_starts(path: Path) -> tuple[int, list[tuple[int, int, str]]]:
    """The offset where tensor data begins, and each tensor's (offset, bytes, name), by offset."""
    try:
        from gguf import GGUFReader
    except ImportError as exc:
        raise ChunkingUnavailable("gguf is not installed (install edgefleet[controlplane])") from exc
    try:
        reader = GGUFReader(path)
        data_start = int(reader.data_offset)
        tensors = sorted((int(t.data_offset), int(t.n_bytes), str(t.name)) for t in reader.tensors)
    except OSError as exc:
        raise UnreadableArtifact(f"cannot read {path}: {exc}") from exc
    except _READER_ERRORS as exc:
        raise MalformedArtifact(f"{path} is not a well-formed GGUF file: {exc}") from exc
    return data_start, tensors


def _pieces(start: int, end: int, piece_bytes: int) -> list[tuple[int, int]]:
    return [(offset, min(piece_bytes, end - offset)) for offset in range(start, end, piece_bytes)]


def tensor_spans(path: Path, limits: ChunkLimits, *, piece_bytes: int = PIECE_BYTES) -> list[tuple[int, int]]:
    """The ``(offset, length)`` spans of ``path``'s tensor-aligned chunks, covering it exactly."""
    if not 0 < piece_bytes <= limits.max_chunk_bytes:
        raise InvalidChunkParameters(f"piece size {piece_bytes} is outside 1..{limits.max_chunk_bytes}")
    size = _check_preamble(path, limits)
    data_start, tensors = _tensor_starts(path)
    # Cut points: where tensor data begins, then where each tensor begins; the padding after a
    # tensor stays with it, and the header runs up to the first tensor.
    starts = [0]
    previous_end = data_start
    for offset, n_bytes, name in tensors:
        if offset < previous_end or offset + n_bytes > size:
            raise MalformedArtifact(f"{path}: tensor {name!r} at {offset} overlaps another or the end")
        if offset > starts[-1]:
            starts.append(offset)
        previous_end = offset + n_bytes
    spans: list[tuple[int, int]] = []
    for start, end in zip(starts, [*starts[1:], size], strict=True):
        spans.extend(_pieces(start, end, piece_bytes))
        if len(spans) > limits.max_chunks:
            raise TooManyChunks(f"{path} needs more than {limits.max_chunks} chunks")
    return spans
