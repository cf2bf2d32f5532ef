"""An artifact's chunk list as signed metadata carries it, and its pure verification.

The publisher cuts each artifact into chunks when it builds a bundle (:func:`chunk_artifact`:
GGUF-tensor-aligned for GGUF files, FastCDC for anything else, the choice
:mod:`.chunking` measured) and signs the list with the artifact's length and hash, inside the
target's ``custom`` data: ``{"edgefleet": {..., "chunks": {"strategy": ..., "chunks": [[length,
sha256], ...]}}}``. Offsets are implied by the order (each chunk starts where the previous one
ended), so a list cannot have gaps or overlaps by construction, only a wrong total, which
:func:`decode_chunks` refuses.

Why inline and bounded: the list is covered by the same signature as the artifact's hash, with
no extra round trip, but it grows the image repository's targets metadata that every device
reads, so a list is at most :data:`MAX_SIGNED_CHUNKS` chunks (~75 bytes each: ~620 KB at the
bound, 22.8 KB for the 98 MB SmolLM2 GGUF cut into 1 MiB pieces). An artifact that would need
more is published without a list and is fetched whole, as artifacts of releases built before
chunk lists existed are; so is a release whose lists would take the image targets past
``fleetctl``'s budget (``controlplane.cli.client.IMAGE_TARGETS_CHUNK_BUDGET_BYTES``).

A chunk list only decides which bytes a device may copy from what it already holds; every
chunk is checked against its hash as it is copied or fetched, and the assembled artifact
against the signed length and hash, so a list cannot make a device accept other bytes.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgefleet.protos.fleet.chunking import (
    Chunk,
    ChunkLimits,
    MalformedArtifact,
    MalformedChunkList,
    Strategy,
    check_chunk_list,
    chunk_file,
    open_artifact,
)
from edgefleet.protos.fleet.chunking_gguf import GGUF_MAGIC

log = logging.getLogger(__name__)

CHUNKS_FIELD = "chunks"
MAX_SIGNED_CHUNKS = 8192
SIGNED_LIMITS = ChunkLimits(max_chunks=MAX_SIGNED_CHUNKS)


@dataclass(frozen=True, slots=True)
class ChunkList:
    """The signed chunks of one artifact and the strategy that cut them (for display: a device
    trusts the list, not the strategy)."""

    strategy: str
    chunks: tuple[Chunk, ...]


def strategy_for(path: Path) -> Strategy:
    """GGUF files are cut by tensor, everything else by content (see :mod:`.chunking`)."""
    with open_artifact(path) as stream:
        head = stream.read(len(GGUF_MAGIC))
    return Strategy.GGUF_TENSORS if head == GGUF_MAGIC else Strategy.CDC


def chunk_artifact(path: Path) -> ChunkList:
    """The chunk list a release signs for the file at ``path``; raises :class:`.chunking.TooManyChunks`
    when it would exceed :data:`MAX_SIGNED_CHUNKS` (the caller publishes the artifact without one).

    A file that starts like a GGUF file but whose tensors cannot be located (a truncated one) is
    cut by content instead: whether it is a model is for the device's runtime to find out, and
    a release that signs it still needs a list that covers it."""
    strategy = strategy_for(path)
    try:
        chunks = chunk_file(path, strategy, limits=SIGNED_LIMITS)
    except MalformedArtifact:
        if strategy is not Strategy.GGUF_TENSORS:
            raise
        log.warning("%s is not a well-formed GGUF file: cutting it by content", path.name)
        strategy = Strategy.CDC
        chunks = chunk_file(path, strategy, limits=SIGNED_LIMITS)
    return ChunkList(strategy=strategy.value, chunks=tuple(chunks))


def encode_chunks(chunk_list: ChunkList) -> dict[str, Any]:
    """The JSON form signed inside a target's custom data."""
    return {"strategy": chunk_list.strategy, CHUNKS_FIELD: [[c.length, c.sha256] for c in chunk_list.chunks]}


def decode_chunks(raw: object, length: int, *, where: str) -> ChunkList:
    """Pure: the chunk list signed for a ``length``-byte artifact; :class:`.chunking.MalformedChunkList`
    (a refusal) when it is not an object of the expected shape, exceeds the bound, or does not
    cover exactly ``length`` bytes. ``where`` names the target in messages."""
    if not isinstance(raw, Mapping):
        raise MalformedChunkList(f"{where}: the chunk list is not an object")
    strategy, entries = raw.get("strategy"), raw.get(CHUNKS_FIELD)
    if not isinstance(strategy, str) or len(strategy) > 64:
        raise MalformedChunkList(f"{where}: the chunk list names no strategy")
    if not isinstance(entries, list):
        raise MalformedChunkList(f"{where}: the chunk list has no list of chunks")
    if len(entries) > MAX_SIGNED_CHUNKS:
        raise MalformedChunkList(f"{where}: {len(entries)} chunks, more than {MAX_SIGNED_CHUNKS}")
    chunks: list[Chunk] = []
    offset = 0
    for index, entry in enumerate(entries):
        match entry:
            case [int(size), str(digest)] if not isinstance(size, bool):
                chunks.append(Chunk(offset, size, digest))
                offset += size
            case _:
                raise MalformedChunkList(f"{where}: chunk {index} is not [length, sha256]")
    try:
        check_chunk_list(chunks, length, SIGNED_LIMITS)
    except MalformedChunkList as exc:
        raise MalformedChunkList(f"{where}: {exc}") from exc
    return ChunkList(strategy=strategy, chunks=tuple(chunks))


def signed_chunks(fields: object, length: int, *, where: str) -> ChunkList | None:
    """The chunk list in a target's ``custom.edgefleet`` object ``fields``, None when it carries
    none (releases built before chunk lists existed: the artifact is fetched whole)."""
    if not isinstance(fields, Mapping) or CHUNKS_FIELD not in fields:
        return None
    return decode_chunks(fields[CHUNKS_FIELD], length, where=where)
