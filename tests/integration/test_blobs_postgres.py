"""Blobs in PostgreSQL large objects, on a real PostgreSQL: what one replica pushes another reads,
from any byte; a wrong, short, aborted or cut-off push leaves nothing anyone can see (not even a
large object); two replicas pushing the same digest at once both succeed and leave one blob;
bytes move in bounded chunks both ways. On SQLite the directory store stays in charge."""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event, text
from sqlalchemy.engine import Engine
from sqlalchemy.exc import OperationalError

from edgefleet.controlplane.store.blob_directory import DirectoryBlobs
from edgefleet.controlplane.store.blob_postgres import WRITE_CHUNK, LargeObjectBlobs
from edgefleet.controlplane.store.blobs import BlobNotFound, BlobStore, InvalidDigest, open_blob_store
from edgefleet.controlplane.store.engine import make_engine
from edgefleet.protos.fleet.release import (
    ArtifactHashMismatch,
    ArtifactInfo,
    ArtifactLengthMismatch,
    ArtifactTooLong,
)

pytestmark = pytest.mark.integration

MIB = 1 << 20


def pieces(seed: int, total: int, size: int) -> Iterator[bytes]:
    """``total`` pseudo-random bytes made ``size`` at a time, never all at once."""
    rng = random.Random(seed)
    made = 0
    while made < total:
        n = min(size, total - made)
        yield rng.randbytes(n)
        made += n


def info_for(seed: int, total: int, path: str = "model.gguf") -> ArtifactInfo:
    digest = hashlib.sha256()
    for piece in pieces(seed, total, MIB):
        digest.update(piece)
    return ArtifactInfo(path=path, length=total, sha256=digest.hexdigest())


def large_objects(engine: Engine) -> int:
    with engine.connect() as conn:
        return int(conn.execute(text("SELECT count(*) FROM pg_largeobject_metadata")).scalar_one())


class Statements:
    """The bytes of every ``lo_put`` an engine sends."""

    def __init__(self, engine: Engine) -> None:
        self.puts: list[int] = []
        event.listen(engine, "before_cursor_execute", self._seen)

    def _seen(self, _conn: Any, _cursor: Any, statement: str, params: Any, *_: Any) -> None:
        if "lo_put" in statement:
            self.puts.append(len(params["data"]))


@pytest.fixture
def replicas(postgres_database: str) -> Iterator[tuple[Engine, Engine]]:
    """Two engines on one database, as two control-plane replicas have."""
    first, second = make_engine(postgres_database), make_engine(postgres_database)
    yield first, second
    first.dispose()
    second.dispose()


def test_what_one_replica_pushes_another_reads_from_any_byte(replicas: tuple[Engine, Engine]) -> None:
    a_engine, b_engine = replicas
    a, b = open_blob_store(a_engine, Path("/nonexistent")), open_blob_store(b_engine, Path("/nonexistent"))
    assert isinstance(a.backend, LargeObjectBlobs) and isinstance(b.backend, LargeObjectBlobs)
    total = 3 * MIB + 12_345
    info = info_for(1, total)
    source = b"".join(pieces(1, total, MIB))
    assert not b.exists(info.sha256)

    a.put(pieces(1, total, 256 * 1024), info)

    assert b.exists(info.sha256) and b.size(info.sha256) == total
    assert b"".join(b.read(info.sha256)) == source
    # Resume from the exact byte: mid-chunk, on a chunk boundary, the last byte, the end.
    for offset in (1, MIB - 1, 2 * MIB, total - 1, total):
        assert b"".join(b.read(info.sha256, offset=offset, chunk_size=MIB)) == source[offset:]
    assert large_objects(b_engine) == 1


def test_a_multi_mib_blob_moves_in_bounded_chunks(replicas: tuple[Engine, Engine]) -> None:
    a_engine, b_engine = replicas
    a, b = BlobStore(LargeObjectBlobs(a_engine)), BlobStore(LargeObjectBlobs(b_engine))
    writes = Statements(a_engine)
    total = 12 * MIB + 5
    info = info_for(2, total)

    a.put(pieces(2, total, 4 * MIB), info)  # pushed messages larger than a write chunk are split

    assert max(writes.puts) == WRITE_CHUNK and sum(writes.puts) == total
    assert len(writes.puts) == 13
    chunk = 256 * 1024
    digest, got, got_chunks = hashlib.sha256(), 0, 0
    for piece in b.read(info.sha256, chunk_size=chunk):
        assert len(piece) <= chunk
        digest.update(piece)
        got += len(piece)
        got_chunks += 1
    assert (got, digest.hexdigest()) == (total, info.sha256)
    assert got_chunks == -(-total // chunk)  # chunk by chunk, never the whole blob at once


@pytest.mark.parametrize(
    ("claimed", "error"),
    [
        (lambda i: ArtifactInfo(i.path, i.length, "0" * 64), ArtifactHashMismatch),
        (lambda i: ArtifactInfo(i.path, i.length + 1, i.sha256), ArtifactLengthMismatch),
    ],
    ids=["wrong-digest", "short-stream"],
)
def test_a_refused_push_leaves_nothing_visible(
    replicas: tuple[Engine, Engine], claimed: Any, error: type[Exception]
) -> None:
    a_engine, b_engine = replicas
    a, b = BlobStore(LargeObjectBlobs(a_engine)), BlobStore(LargeObjectBlobs(b_engine))
    info = claimed(info_for(3, 2 * MIB + 7))
    with pytest.raises(error):
        a.put(pieces(3, 2 * MIB + 7, MIB), info)
    assert not a.exists(info.sha256) and not b.exists(info.sha256)
    with pytest.raises(BlobNotFound):
        b.size(info.sha256)
    with pytest.raises(BlobNotFound):
        next(b.read(info.sha256))
    assert large_objects(b_engine) == 0


def test_too_many_bytes_are_refused_before_they_are_written(replicas: tuple[Engine, Engine]) -> None:
    a_engine, _ = replicas
    writes = Statements(a_engine)
    a = BlobStore(LargeObjectBlobs(a_engine))
    info = info_for(4, MIB)
    with a.writer(info) as writer:
        writer.write(next(pieces(4, MIB, MIB)))
        with pytest.raises(ArtifactTooLong):
            writer.write(b"x")
    assert sum(writes.puts) == MIB
    assert not a.exists(info.sha256) and large_objects(a_engine) == 0


def test_an_interrupted_push_is_invisible_and_leaves_no_large_object(
    replicas: tuple[Engine, Engine],
) -> None:
    a_engine, b_engine = replicas
    a, b = BlobStore(LargeObjectBlobs(a_engine)), BlobStore(LargeObjectBlobs(b_engine))
    info = info_for(5, 3 * MIB)

    # Aborted by the caller (the operator's stream broke) half-way.
    with a.writer(info) as writer:
        writer.write(next(pieces(5, 3 * MIB, MIB)))
    assert not b.exists(info.sha256) and large_objects(b_engine) == 0

    # The pushing replica's connection dies half-way (process killed, network cut).
    writer = a.writer(info)
    pushed = pieces(5, 3 * MIB, MIB)
    writer.write(next(pushed))
    with b_engine.connect() as conn:
        assert large_objects(b_engine) == 0  # written, not yet visible to anyone else
        killed = conn.execute(
            text(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = current_database() AND state = 'idle in transaction'"
            )
        ).all()
    assert len(killed) == 1
    with pytest.raises(OperationalError):  # the connection is gone; its transaction with it
        writer.write(next(pushed))
    writer.abort()
    assert not b.exists(info.sha256) and large_objects(b_engine) == 0


def test_concurrent_pushes_of_one_digest_both_succeed_and_leave_one_blob(
    replicas: tuple[Engine, Engine],
) -> None:
    a_engine, b_engine = replicas
    a, b = BlobStore(LargeObjectBlobs(a_engine)), BlobStore(LargeObjectBlobs(b_engine))
    total = 2 * MIB + 3
    info = info_for(6, total)
    with a.writer(info) as via_a, b.writer(info) as via_b:
        for piece_a, piece_b in zip(pieces(6, total, MIB), pieces(6, total, MIB), strict=True):
            via_a.write(piece_a)
            via_b.write(piece_b)
        via_a.commit()
        via_b.commit()  # finds A's blob published: keeps it, drops its own copy
    assert large_objects(a_engine) == 1
    with a_engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM blob")).scalar_one() == 1
    assert b"".join(b.read(info.sha256)) == b"".join(pieces(6, total, MIB))

    # A later push of the published digest only checks the bytes: nothing is written again.
    writes = Statements(b_engine)
    b.put(pieces(6, total, MIB), info)
    assert writes.puts == [] and large_objects(a_engine) == 1
    with pytest.raises(ArtifactHashMismatch):  # and wrong bytes under that digest are still refused
        b.put(pieces(7, total, MIB), info)


def test_opening_the_store_unlinks_large_objects_no_blob_names(replicas: tuple[Engine, Engine]) -> None:
    a_engine, b_engine = replicas
    a = BlobStore(LargeObjectBlobs(a_engine))
    info = info_for(8, MIB)
    a.put(pieces(8, MIB, MIB), info)
    with a_engine.begin() as conn:
        conn.execute(text("SELECT lo_from_bytea(0, 'left behind')"))
    assert large_objects(a_engine) == 2

    opened = open_blob_store(b_engine, Path("/nonexistent"))

    assert large_objects(a_engine) == 1
    assert b"".join(opened.read(info.sha256)) == b"".join(pieces(8, MIB, MIB))


def test_sqlite_keeps_blobs_in_the_directory(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'cp.sqlite3'}")
    try:
        store = open_blob_store(engine, tmp_path / "blobs")
    finally:
        engine.dispose()
    assert isinstance(store.backend, DirectoryBlobs)
    info = info_for(9, MIB + 1)
    store.put(pieces(9, MIB + 1, MIB), info)
    on_disk = tmp_path / "blobs" / "sha256" / info.sha256[:2] / info.sha256
    assert on_disk.read_bytes() == b"".join(pieces(9, MIB + 1, MIB))
    assert b"".join(store.read(info.sha256, offset=MIB)) == on_disk.read_bytes()[MIB:]
    with pytest.raises(InvalidDigest):
        store.size("../../etc/passwd")
