"""The device's chunk index: for every artifact it holds, the chunk list its release signed.

When an artifact that came with a signed chunk list enters the store, its list is written
next to the store (``<index_dir>/<sha256>.json``, atomically). Before a new artifact is
fetched, :meth:`ChunkIndex.held` reads the lists of the artifacts still in the store and says
where each chunk hash can be read locally. The lists come from verified metadata, but the
index is a hint, not a proof: a copied chunk is hashed again, so a damaged index file or a
changed artifact only costs a fetch, never a wrong byte. Index files are bounded when read and
skipped when unreadable; artifacts installed before chunk lists existed simply have none.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from edgefleet.agent.update.delta_plan import HeldChunk
from edgefleet.protos.fleet.chunk_list import ChunkList, decode_chunks, encode_chunks
from edgefleet.protos.fleet.fsio import atomic_write_bytes
from edgefleet.protos.fleet.release import Refusal

log = logging.getLogger(__name__)

SUFFIX = ".json"
MAX_INDEX_FILE_BYTES = 2 * 1024 * 1024  # a signed list at its bound is ~650 KB
MAX_INDEXED_ARTIFACTS = 64  # a device holds a few models and their rollback copies


@dataclass(frozen=True, slots=True)
class ChunkIndex:
    """Chunk lists of the artifacts in ``artifact_dir``, kept in ``index_dir``."""

    index_dir: Path
    artifact_dir: Path

    def path(self, sha256: str) -> Path:
        return self.index_dir / f"{sha256}{SUFFIX}"

    def record(self, sha256: str, chunks: ChunkList) -> None:
        """Keeps the signed chunk list of the stored artifact ``sha256``."""
        self.index_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(self.path(sha256), json.dumps(encode_chunks(chunks)).encode())

    def has(self, sha256: str) -> bool:
        return self.path(sha256).is_file()

    def held(self, *, exclude: str = "") -> dict[str, HeldChunk]:
        """Where each chunk hash of the indexed, stored artifacts (but ``exclude``) can be read."""
        held: dict[str, HeldChunk] = {}
        if not self.index_dir.is_dir():
            return held
        entries = sorted(self.index_dir.glob(f"*{SUFFIX}"))[:MAX_INDEXED_ARTIFACTS]
        for entry in entries:
            sha256 = entry.name.removesuffix(SUFFIX)
            artifact = self.artifact_dir / sha256
            if sha256 == exclude or not artifact.is_file() or artifact.is_symlink():
                continue
            chunks = self._read(entry, artifact)
            if chunks is None:
                continue
            for chunk in chunks.chunks:
                held.setdefault(chunk.sha256, HeldChunk(artifact, chunk.offset, chunk.length))
        return held

    @staticmethod
    def _read(entry: Path, artifact: Path) -> ChunkList | None:
        """The list in ``entry`` if it covers ``artifact`` as it is now, else None (logged)."""
        try:
            if entry.stat().st_size > MAX_INDEX_FILE_BYTES:
                raise ValueError(f"longer than {MAX_INDEX_FILE_BYTES} bytes")
            raw = json.loads(entry.read_bytes())
            return decode_chunks(raw, artifact.stat().st_size, where=f"chunk index {entry.name}")
        except (OSError, ValueError, Refusal) as exc:
            log.warning("ignoring chunk index %s: %s", entry, exc)
            return None
