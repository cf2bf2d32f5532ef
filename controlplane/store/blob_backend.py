"""What a blob store backend is: the calls ``blobs.BlobStore`` delegates to, and its errors.

Two backends keep artifacts: a local content-addressed directory (``blob_directory``, one node on
SQLite) and PostgreSQL large objects (``blob_postgres``, every replica on one database). Both
publish a blob under its digest only after its bytes matched the signed length and hash, and
both read from any byte offset, so a device's download resumes where it stopped.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Protocol

from edgefleet.protos.fleet.release import ArtifactInfo

DIGEST = re.compile(r"^[0-9a-f]{64}$")
READ_CHUNK = 1 << 20


class BlobError(Exception):
    """Base of blob-store errors."""


class BlobNotFound(BlobError):
    """No blob with that digest."""


class InvalidDigest(BlobError):
    """The digest is not 64 lowercase hex characters."""


class WriterClosed(BlobError):
    """A blob writer was used after it committed or aborted (a caller's bug)."""


def check_digest(sha256: str) -> str:
    """``sha256`` if it is a digest a blob can be stored under; raises InvalidDigest."""
    if not DIGEST.match(sha256):
        raise InvalidDigest(f"{sha256[:80]!r} is not a sha256 hex digest")
    return sha256


class BlobWriter(Protocol):
    """One blob being written: ``write`` checks each chunk as it arrives (too many bytes raise
    ArtifactTooLong at once), ``commit`` checks length and hash and only then publishes.

    Used as a context manager: leaving without ``commit`` discards what was written.
    """

    def write(self, chunk: bytes) -> None: ...

    def commit(self) -> None: ...

    def abort(self) -> None: ...

    def __enter__(self) -> BlobWriter: ...

    def __exit__(self, *exc: object) -> None: ...


class BlobBackend(Protocol):
    """Where blobs live. Digests reach a backend already checked (``check_digest``)."""

    def exists(self, sha256: str) -> bool: ...

    def size(self, sha256: str) -> int:
        """The blob's length in bytes; raises BlobNotFound."""
        ...

    def writer(self, info: ArtifactInfo) -> BlobWriter: ...

    def read(self, sha256: str, *, offset: int, chunk_size: int) -> Iterator[bytes]:
        """The blob's bytes from ``offset``, at most ``chunk_size`` at a time; raises
        BlobNotFound (on the first ``next``)."""
        ...
