"""Content-addressed artifact storage: ``<root>/sha256/<aa>/<digest>``.

An artifact becomes visible under its digest only after its bytes were checked against the
signed length and hash, so a reader never sees a partial or wrong blob.
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from edgefleet.protos.fleet.fsio import fsync_dir
from edgefleet.protos.fleet.release import ArtifactInfo, ArtifactVerifier

DIGEST = re.compile(r"^[0-9a-f]{64}$")
READ_CHUNK = 1 << 20


class BlobError(Exception):
    """Base of blob-store errors."""


class BlobNotFound(BlobError):
    """No blob with that digest."""


class InvalidDigest(BlobError):
    """The digest is not 64 lowercase hex characters."""


@dataclass(frozen=True, slots=True)
class BlobStore:
    root: Path

    def path_for(self, sha256: str) -> Path:
        if not DIGEST.match(sha256):
            raise InvalidDigest(f"{sha256!r} is not a sha256 hex digest")
        return self.root / "sha256" / sha256[:2] / sha256

    def exists(self, sha256: str) -> bool:
        return self.path_for(sha256).is_file()

    def size(self, sha256: str) -> int:
        try:
            return self.path_for(sha256).stat().st_size
        except FileNotFoundError as exc:
            raise BlobNotFound(f"no artifact {sha256}") from exc

    def writer(self, info: ArtifactInfo) -> BlobWriter:
        """A writer that publishes the blob under its digest only once it verified."""
        return BlobWriter(self.path_for(info.sha256), info)

    def put(self, chunks: Iterable[bytes], info: ArtifactInfo) -> Path:
        """Writes, verifies against ``info`` and publishes atomically; raises ArtifactError on mismatch."""
        with self.writer(info) as writer:
            for chunk in chunks:
                writer.write(chunk)
            return writer.commit()

    def read(self, sha256: str, *, offset: int = 0, chunk_size: int = READ_CHUNK) -> Iterator[bytes]:
        """Yields the blob's bytes from ``offset`` in chunks."""
        path = self.path_for(sha256)
        try:
            f = path.open("rb")
        except FileNotFoundError as exc:
            raise BlobNotFound(f"no artifact {sha256}") from exc
        with f:
            f.seek(offset)
            while chunk := f.read(chunk_size):
                yield chunk


class BlobWriter:
    """Streams bytes into a temporary file beside the final path; ``commit`` verifies and renames.

    Used as a context manager: leaving without ``commit`` removes the temporary file.
    """

    def __init__(self, final: Path, info: ArtifactInfo) -> None:
        self.final = final
        self.verifier = ArtifactVerifier(info)
        final.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(dir=final.parent, prefix=".incoming.", suffix=".tmp")
        self._tmp = Path(tmp_name)
        self._file = os.fdopen(fd, "wb")
        self._committed = False

    def write(self, chunk: bytes) -> None:
        self.verifier.update(chunk)
        self._file.write(chunk)

    def commit(self) -> Path:
        self.verifier.finish()
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        os.chmod(self._tmp, 0o444)
        os.replace(self._tmp, self.final)
        fsync_dir(self.final.parent)
        self._committed = True
        return self.final

    def abort(self) -> None:
        if not self._committed:
            self._file.close()
            self._tmp.unlink(missing_ok=True)

    def __enter__(self) -> BlobWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.abort()
