"""Blobs in PostgreSQL large objects: every replica on one database reads every artifact.

Why large objects: an artifact is hundreds of MiB to GiB; a ``bytea`` row would be read and
written whole, while a large object is written and read in chunks at any offset. psycopg 3 has
no large-object API, so this uses the server functions ``lo_create``, ``lo_put(oid, offset,
bytea)``, ``lo_get(oid, offset, length)`` and ``lo_unlink``, one chunk per call: no blob is ever
held whole in memory, here or in the server.

Verify-then-publish in one transaction: a writer creates its large object, writes each chunk
and hashes it as it arrives, and only when length and sha256 match inserts the ``blob`` row
(``models.StoredBlob``) naming it, then commits. Large-object creation is transactional, so a
refused, aborted or interrupted push (the process killed, the connection cut) rolls back and
its large object goes with it: no reader ever sees a partial or unverified blob, and nothing is
left behind. Two replicas pushing the same digest at once both succeed: the second insert finds
the first's row (``ON CONFLICT DO NOTHING`` waits for it to commit) and rolls back its own copy.
A writer that finds the digest already published only hashes the bytes (a wrong push is still
refused) and stores nothing. The cost: one connection and one open transaction per artifact
being pushed, for as long as its bytes take to arrive.

Reads look the blob up once and then take each chunk with its own short ``lo_get`` on a pooled
connection, so a download holds no connection between chunks and resumes from any byte through
any replica. ``sweep_orphans`` unlinks large objects no blob names (there should be none: only
a row deleted by hand leaves one), run when the store opens.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import psycopg
from sqlalchemy import Connection, RootTransaction, select, text
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.engine import Engine
from sqlmodel import col

from edgefleet.controlplane.store.blob_backend import BlobNotFound, WriterClosed
from edgefleet.controlplane.store.models import StoredBlob
from edgefleet.protos.fleet.release import ArtifactInfo, ArtifactVerifier

log = logging.getLogger(__name__)

WRITE_CHUNK = 1 << 20
"""The most bytes one ``lo_put`` sends: a pushed message larger than this is split."""

_LO_CREATE = text("SELECT lo_create(0)")
_LO_PUT = text("SELECT lo_put(:loid, :offset, :data)")
_LO_GET = text("SELECT lo_get(:loid, :offset, :length)")
_LO_GET_BINARY = "SELECT lo_get(%s, %s, %s)"
_SWEEP = text(
    "SELECT count(lo_unlink(m.oid)) FROM pg_largeobject_metadata m "
    "WHERE m.lomowner = (SELECT oid FROM pg_roles WHERE rolname = current_user) "
    "AND NOT EXISTS (SELECT 1 FROM blob b WHERE b.loid = m.oid)"
)


class LargeObjectBlobs:
    """The blob backend of control planes on PostgreSQL (see the module docstring)."""

    def __init__(self, engine: Engine, *, write_chunk: int = WRITE_CHUNK) -> None:
        self.engine = engine
        self.write_chunk = write_chunk

    def _find(self, sha256: str) -> tuple[int, int] | None:
        """(large object oid, length) of a published blob."""
        with self.engine.connect() as conn:
            row = conn.execute(
                select(col(StoredBlob.loid), col(StoredBlob.length)).where(col(StoredBlob.sha256) == sha256)
            ).one_or_none()
        return None if row is None else (int(row[0]), int(row[1]))

    def exists(self, sha256: str) -> bool:
        return self._find(sha256) is not None

    def size(self, sha256: str) -> int:
        found = self._find(sha256)
        if found is None:
            raise BlobNotFound(f"no artifact {sha256}")
        return found[1]

    def writer(self, info: ArtifactInfo) -> LargeObjectWriter:
        return LargeObjectWriter(self.engine, info, write_chunk=self.write_chunk)

    def read(self, sha256: str, *, offset: int, chunk_size: int) -> Iterator[bytes]:
        found = self._find(sha256)
        if found is None:
            raise BlobNotFound(f"no artifact {sha256}")
        loid, length = found
        while offset < length:
            wanted = min(chunk_size, length - offset)
            yield self._get(loid, offset, wanted)
            offset += wanted

    def _get(self, loid: int, offset: int, length: int) -> bytes:
        """One chunk, in a short transaction of its own. With psycopg the result comes in binary
        format: as text, a bytea travels hex-encoded, twice its size, and reads ran 3x slower."""
        with self.engine.connect() as conn:
            driver = conn.connection.driver_connection
            if isinstance(driver, psycopg.Connection):
                row = driver.execute(_LO_GET_BINARY, (loid, offset, length), binary=True).fetchone()
                data = None if row is None else row[0]
            else:
                data = conn.execute(_LO_GET, {"loid": loid, "offset": offset, "length": length}).scalar_one()
        if not isinstance(data, bytes | bytearray | memoryview):
            raise BlobNotFound(f"large object {loid} gave no bytes at offset {offset}")
        return bytes(data)

    def sweep_orphans(self) -> int:
        """Unlinks this role's large objects that no blob names; returns how many. Safe while
        other replicas push: a large object still being written is invisible here until the
        commit that also inserts its blob row."""
        with self.engine.begin() as conn:
            swept = int(conn.execute(_SWEEP).scalar_one())
        if swept:
            log.warning("unlinked %d large object(s) that no blob named", swept)
        return swept


class LargeObjectWriter:
    """One artifact streaming into a new large object inside one transaction on its own
    connection; ``commit`` verifies, publishes and commits, anything else rolls it all back."""

    def __init__(self, engine: Engine, info: ArtifactInfo, *, write_chunk: int) -> None:
        self.info = info
        self.verifier = ArtifactVerifier(info)
        self.write_chunk = write_chunk
        self._conn: Connection | None = engine.connect()
        try:
            self._tx: RootTransaction = self._conn.begin()
            published = self._conn.execute(
                select(col(StoredBlob.sha256)).where(col(StoredBlob.sha256) == info.sha256)
            ).first()
            # Already published: the bytes are only hashed, so a wrong push is still refused.
            self._loid: int | None = None if published else int(self._conn.execute(_LO_CREATE).scalar_one())
        except BaseException:
            self._close()
            raise
        self._offset = 0

    def write(self, chunk: bytes) -> None:
        conn = self._open()
        self.verifier.update(chunk)  # more than the signed length raises before anything is written
        if self._loid is not None:
            view = memoryview(chunk)
            for start in range(0, len(view), self.write_chunk):
                piece = view[start : start + self.write_chunk]
                conn.execute(_LO_PUT, {"loid": self._loid, "offset": self._offset, "data": piece})
                self._offset += len(piece)

    def commit(self) -> None:
        """Checks length and hash (ArtifactError), then publishes the blob and commits; when
        another push published the same digest first, keeps that one and drops this copy."""
        conn = self._open()
        self.verifier.finish()
        try:
            if self._loid is None:
                self._tx.rollback()
                return
            inserted = conn.execute(
                insert(StoredBlob)
                .values(sha256=self.info.sha256, length=self.info.length, loid=self._loid)
                .on_conflict_do_nothing(index_elements=["sha256"])
                .returning(col(StoredBlob.sha256))
            ).first()
            if inserted is None:
                self._tx.rollback()  # the same bytes were published meanwhile; this copy goes
            else:
                self._tx.commit()
        finally:
            self._close()

    def abort(self) -> None:
        """Rolls back whatever was written (the large object with it); after commit, nothing."""
        self._close()

    def _open(self) -> Connection:
        if self._conn is None:
            raise WriterClosed(f"the writer of {self.info.sha256} was committed or aborted")
        return self._conn

    def _close(self) -> None:
        if self._conn is not None:
            conn, self._conn = self._conn, None
            conn.close()  # rolls back a transaction still open

    def __enter__(self) -> LargeObjectWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.abort()
