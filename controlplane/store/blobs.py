"""Content-addressed artifact storage: the ``BlobStore`` the servicers push to and read from.

An artifact becomes visible under its digest only after its bytes were checked against the
signed length and hash, so a reader never sees a partial or wrong blob; reads start at any byte
offset, so downloads resume. Where the bytes live follows the database (``open_blob_store``): a
local directory for one control plane on SQLite (``blob_directory``), PostgreSQL large objects
when replicas share a PostgreSQL database (``blob_postgres``), so an artifact pushed through one
replica downloads through any other. The interface and errors are ``blob_backend``'s.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

from sqlalchemy.engine import Engine

from edgefleet.controlplane.store.blob_backend import (
    DIGEST,
    READ_CHUNK,
    BlobBackend,
    BlobError,
    BlobNotFound,
    BlobWriter,
    InvalidDigest,
    WriterClosed,
    check_digest,
)
from edgefleet.controlplane.store.blob_directory import DirectoryBlobs
from edgefleet.controlplane.store.blob_postgres import LargeObjectBlobs
from edgefleet.protos.fleet.release import ArtifactInfo

__all__ = [
    "DIGEST",
    "READ_CHUNK",
    "BlobError",
    "BlobNotFound",
    "BlobStore",
    "BlobWriter",
    "InvalidDigest",
    "WriterClosed",
    "open_blob_store",
]


class BlobStore:
    """The blob store of one control plane: checks digests, then asks its backend.

    ``BlobStore(path)`` keeps blobs in that directory; ``open_blob_store`` picks the backend
    for a database.
    """

    def __init__(self, where: Path | BlobBackend) -> None:
        self.backend: BlobBackend = DirectoryBlobs(where) if isinstance(where, Path) else where

    def exists(self, sha256: str) -> bool:
        return self.backend.exists(check_digest(sha256))

    def size(self, sha256: str) -> int:
        """The blob's length; raises BlobNotFound or InvalidDigest."""
        return self.backend.size(check_digest(sha256))

    def writer(self, info: ArtifactInfo) -> BlobWriter:
        """A writer that publishes the blob under its digest only once it verified."""
        check_digest(info.sha256)
        return self.backend.writer(info)

    def put(self, chunks: Iterable[bytes], info: ArtifactInfo) -> None:
        """Writes, verifies against ``info`` and publishes; raises ArtifactError on mismatch."""
        with self.writer(info) as writer:
            for chunk in chunks:
                writer.write(chunk)
            writer.commit()

    def read(self, sha256: str, *, offset: int = 0, chunk_size: int = READ_CHUNK) -> Iterator[bytes]:
        """The blob's bytes from ``offset``, at most ``chunk_size`` at a time. Raises
        InvalidDigest at once, BlobNotFound on the first ``next``."""
        return self.backend.read(check_digest(sha256), offset=offset, chunk_size=chunk_size)


def open_blob_store(engine: Engine, directory: Path) -> BlobStore:
    """The blob store for a control plane on ``engine``: PostgreSQL large objects when the
    database is PostgreSQL (replicas share it; large objects no blob names are unlinked here),
    else files under ``directory`` (one node). Blocks: call it off the event loop."""
    if engine.dialect.name == "postgresql":
        large_objects = LargeObjectBlobs(engine)
        large_objects.sweep_orphans()
        return BlobStore(large_objects)
    return BlobStore(DirectoryBlobs(directory))
