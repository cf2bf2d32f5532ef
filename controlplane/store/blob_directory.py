"""Blobs in a local content-addressed directory, ``<root>/sha256/<aa>/<digest>``: one control
plane on SQLite.

A blob is written to a temporary file beside its final path and renamed there only once its
bytes matched, so a reader never sees a partial or wrong blob.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from edgefleet.controlplane.store.blob_backend import BlobNotFound, check_digest
from edgefleet.protos.fleet.fsio import fsync_dir
from edgefleet.protos.fleet.release import ArtifactInfo, ArtifactVerifier


@dataclass(frozen=True, slots=True)
class DirectoryBlobs:
    root: Path

    def path_for(self, sha256: str) -> Path:
        return self.root / "sha256" / sha256[:2] / check_digest(sha256)

    def exists(self, sha256: str) -> bool:
        return self.path_for(sha256).is_file()

    def size(self, sha256: str) -> int:
        try:
            return self.path_for(sha256).stat().st_size
        except FileNotFoundError as exc:
            raise BlobNotFound(f"no artifact {sha256}") from exc

    def writer(self, info: ArtifactInfo) -> DirectoryBlobWriter:
        return DirectoryBlobWriter(self.path_for(info.sha256), info)

    def read(self, sha256: str, *, offset: int, chunk_size: int) -> Iterator[bytes]:
        path = self.path_for(sha256)
        try:
            f = path.open("rb")
        except FileNotFoundError as exc:
            raise BlobNotFound(f"no artifact {sha256}") from exc
        with f:
            f.seek(offset)
            while chunk := f.read(chunk_size):
                yield chunk


class DirectoryBlobWriter:
    """Streams bytes into a temporary file beside the final path; ``commit`` verifies, fsyncs
    and renames. Leaving without ``commit`` removes the temporary file."""

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

    def commit(self) -> None:
        self.verifier.finish()
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        os.chmod(self._tmp, 0o444)
        os.replace(self._tmp, self.final)
        fsync_dir(self.final.parent)
        self._committed = True

    def abort(self) -> None:
        if not self._committed:
            self._file.close()
            self._tmp.unlink(missing_ok=True)

    def __enter__(self) -> DirectoryBlobWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.abort()
