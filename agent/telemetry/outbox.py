"""The agent's durable telemetry queue: records wait here until the broker acknowledges them.

A device is often offline (NAT, flaky links, the broker being upgraded), and telemetry taken
while offline is the telemetry an operator most wants to see afterwards. So every record is
committed to SQLite in the agent's state dir *before* anything tries to send it, and is deleted
only when the broker's PUBACK for the message carrying it arrives. The control plane deduplicates by
(device, seq), which makes resending after a crash harmless; this module's job is to make sure
the sequence numbers are never reused and nothing ``put()`` returned for is lost.

Durability choice: WAL with ``synchronous=FULL``. WAL alone survives a killed process; FULL also
fsyncs the WAL on every commit, which is what survives a power cut on a device (the common way
an edge box "crashes"). The cost, one fsync per record, is small next to an inference request.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

from google.protobuf import json_format
from google.protobuf.message import Message

from edgefleet.protos.fleet.fsio import atomic_write_bytes
from edgefleet.protos.fleet.topics import MESSAGE_TYPES, TelemetryMessage, TopicKind

_SCHEMA_VERSION = 1

SEQ_BLOCK = 10_000
"""Sequence numbers are reserved in blocks in a file beside the database (``<name>.seq``): an
outbox that must be replaced (corrupt) continues above every seq the old one could have used,
since the control plane keeps one record per (device, seq) and would drop a reused one."""

_SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    seq INTEGER PRIMARY KEY,
    kind TEXT NOT NULL,
    payload BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
INSERT OR IGNORE INTO meta (key, value) VALUES ('next_seq', 1);
INSERT OR IGNORE INTO meta (key, value) VALUES ('dropped', 0);
INSERT OR IGNORE INTO meta (key, value) VALUES ('discarded', 0);
"""


class OutboxError(Exception):
    """The outbox database cannot be used (unwritable, disk full, locked by another process)."""


class OutboxCorruptError(OutboxError):
    """The outbox file is not a usable database; retrying will not help, moving it aside will."""


@dataclass(frozen=True, slots=True)
class OutboxItem:
    """One stored record, ready to publish: ``payload`` is the protobuf JSON encoding."""

    seq: int
    kind: TopicKind
    payload: bytes


def encode_message(message: Message) -> bytes:
    """Protobuf's JSON mapping with lowerCamelCase names, as the contract and the ingestor expect.

    Fields at their default value are written out too, so a dashboard reading the topic with a
    plain MQTT client sees every field of the schema and not only the non-zero ones.
    """
    text = json_format.MessageToJson(
        message,
        preserving_proto_field_name=False,
        always_print_fields_with_no_presence=True,
        indent=None,
    )
    return text.encode("utf-8")


def encode_batch(payloads: Sequence[bytes]) -> bytes:
    """The wire form of a record stream message: a JSON array of encoded records, oldest first.

    Records are stored already encoded (``encode_message``), so a batch is their bytes joined,
    not a second round of protobuf encoding on the publish path.
    """
    if not payloads:
        raise ValueError("a telemetry message carries at least one record")
    return b"[" + b",".join(payloads) + b"]"


def batch_size(payload_sizes: int, records: int) -> int:
    """The size ``encode_batch`` gives ``records`` payloads of ``payload_sizes`` bytes in total."""
    return payload_sizes + max(records - 1, 0) + 2


class Outbox:
    """A bounded, durable, thread-safe FIFO of encoded telemetry records for one device.

    One instance per state dir and process: the publisher thread acks while the API thread
    puts, and a single lock around a single connection keeps that simple and correct.
    """

    def __init__(self, path: Path, *, max_records: int = 100_000, seq_floor: int = 1) -> None:
        """``seq_floor``: the lowest seq the next ``put`` may assign (a replacement outbox
        starts above its predecessor's seqs)."""
        if max_records < 1:
            raise ValueError("max_records must be at least 1")
        self._path = Path(path)
        self._max_records = max_records
        self._lock = threading.Lock()
        self._reserved = read_seq_mark(self._path)
        self._conn = self._open()
        try:
            self._raise_floor(seq_floor)
        except OutboxError:
            self._conn.close()
            raise
        try:
            self._count = self._scalar("SELECT COUNT(*) FROM outbox")
        except OutboxError:
            self._conn.close()
            raise

    @property
    def path(self) -> Path:
        return self._path

    @property
    def max_records(self) -> int:
        return self._max_records

    def _open(self) -> sqlite3.Connection:
        try:
            self._path.parent.mkdir(parents=True, exist_ok=True)
            # isolation_level=None: transactions are explicit (BEGIN IMMEDIATE) so a put's
            # sequence-number bump, insert and drop commit together or not at all.
            conn = sqlite3.connect(self._path, isolation_level=None, check_same_thread=False, timeout=10.0)
        except (OSError, sqlite3.Error) as exc:
            raise OutboxError(f"cannot open telemetry outbox {self._path}: {exc}") from exc
        try:
            mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()
            if mode is None or str(mode[0]).lower() != "wal":
                raise OutboxError(f"telemetry outbox {self._path}: WAL journal mode is not available")
            conn.execute("PRAGMA synchronous=FULL")
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version > _SCHEMA_VERSION:
                raise OutboxError(
                    f"telemetry outbox {self._path} has schema {version}, newer than this agent's "
                    f"{_SCHEMA_VERSION}"
                )
            conn.executescript(f"BEGIN IMMEDIATE;{_SCHEMA}PRAGMA user_version={_SCHEMA_VERSION};COMMIT;")
        except sqlite3.DatabaseError as exc:
            conn.close()
            raise _translate(exc, self._path) from exc
        except OutboxError:
            conn.close()
            raise
        return conn

    def _raise_floor(self, floor: int) -> None:
        with self._lock, self._transaction() as conn:
            conn.execute("UPDATE meta SET value = MAX(value, ?) WHERE key = 'next_seq'", (floor,))

    def _reserve(self, seq: int) -> None:
        """Caller holds the lock: records in the mark file that seqs below the new mark may be
        in use, before ``seq`` is used. One small durable write per SEQ_BLOCK records."""
        if seq < self._reserved:
            return
        mark = seq + SEQ_BLOCK
        try:
            atomic_write_bytes(seq_mark_path(self._path), str(mark).encode(), mode=0o600)
        except OSError as exc:
            raise OutboxError(
                f"telemetry outbox {self._path}: cannot reserve sequence numbers: {exc}"
            ) from exc
        self._reserved = mark

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """Caller holds the lock; rolls back on any error and reports it as an OutboxError."""
        conn = self._conn
        try:
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            raise _translate(exc, self._path) from exc
        try:
            yield conn
            conn.execute("COMMIT")
        except BaseException as exc:
            with suppress(sqlite3.Error):  # the original error is the one worth reporting
                conn.execute("ROLLBACK")
            if isinstance(exc, sqlite3.Error):
                raise _translate(exc, self._path) from exc
            raise

    def _scalar(self, sql: str, params: tuple[object, ...] = ()) -> int:
        try:
            row = self._conn.execute(sql, params).fetchone()
        except sqlite3.Error as exc:
            raise _translate(exc, self._path) from exc
        return int(row[0]) if row is not None else 0

    def put(self, kind: TopicKind, message: TelemetryMessage) -> int:
        """Assigns the next sequence number to ``message.seq``, stores it durably, returns the seq.

        Once this returns the record survives a crash. When the outbox is full the oldest
        inference or heartbeat record is dropped first (and counted): deployment events are
        rare and say what the device runs, so they are the last to go.
        """
        kind = TopicKind(kind)
        if not isinstance(message, MESSAGE_TYPES[kind]):
            raise TypeError(f"a {kind.value} record must be a {MESSAGE_TYPES[kind].__name__} message")
        with self._lock:
            seq, self._count = self._insert(kind, message)
        return seq

    def _insert(self, kind: TopicKind, message: TelemetryMessage) -> tuple[int, int]:
        """Caller holds the lock; returns (seq, new record count) once committed."""
        with self._transaction() as conn:
            seq = int(conn.execute("SELECT value FROM meta WHERE key = 'next_seq'").fetchone()[0])
            self._reserve(seq)
            message.seq = seq
            payload = encode_message(message)
            conn.execute("UPDATE meta SET value = ? WHERE key = 'next_seq'", (seq + 1,))
            dropped = 0
            count = self._count
            while count >= self._max_records:
                victim = conn.execute(
                    "SELECT seq FROM outbox WHERE kind != ? ORDER BY seq LIMIT 1",
                    (TopicKind.DEPLOYMENT.value,),
                ).fetchone()
                if victim is None:
                    victim = conn.execute("SELECT seq FROM outbox ORDER BY seq LIMIT 1").fetchone()
                conn.execute("DELETE FROM outbox WHERE seq = ?", (victim[0],))
                count -= 1
                dropped += 1
            if dropped:
                conn.execute("UPDATE meta SET value = value + ? WHERE key = 'dropped'", (dropped,))
            conn.execute(
                "INSERT INTO outbox (seq, kind, payload) VALUES (?, ?, ?)", (seq, kind.value, payload)
            )
        return seq, count + 1

    def pending(self, limit: int = 100, *, after: int = 0) -> list[OutboxItem]:
        """Up to ``limit`` records with seq greater than ``after``, oldest first."""
        with self._lock:
            try:
                rows = self._conn.execute(
                    "SELECT seq, kind, payload FROM outbox WHERE seq > ? ORDER BY seq LIMIT ?",
                    (after, limit),
                ).fetchall()
            except sqlite3.Error as exc:
                raise _translate(exc, self._path) from exc
        return [OutboxItem(seq=int(s), kind=TopicKind(k), payload=bytes(p)) for s, k, p in rows]

    def ack(self, seq: int) -> bool:
        """Deletes a record the broker has acknowledged; False if it was already gone."""
        return self.ack_many([seq]) == 1

    def ack_many(self, seqs: Iterable[int]) -> int:
        """Deletes several acknowledged records in one transaction (one fsync); returns how many."""
        return self._delete(seqs, counter=None)

    def discard(self, seqs: Iterable[int]) -> int:
        """Deletes records the broker will never accept (larger than it allows, or refused again
        and again), counting them apart from ``dropped``: they are lost, not crowded out."""
        return self._delete(seqs, counter="discarded")

    def _delete(self, seqs: Iterable[int], *, counter: str | None) -> int:
        params = [(int(s),) for s in seqs]
        if not params:
            return 0
        with self._lock:
            with self._transaction() as conn:
                before = conn.total_changes
                conn.executemany("DELETE FROM outbox WHERE seq = ?", params)
                deleted = conn.total_changes - before
                if counter is not None and deleted:
                    conn.execute("UPDATE meta SET value = value + ? WHERE key = ?", (deleted, counter))
            self._count -= deleted
        return deleted

    @property
    def discarded(self) -> int:
        """How many records were discarded because the broker would not take them, over its life."""
        with self._lock:
            return self._scalar("SELECT value FROM meta WHERE key = 'discarded'")

    @property
    def dropped(self) -> int:
        """How many records were discarded because the outbox was full, over its whole life."""
        with self._lock:
            return self._scalar("SELECT value FROM meta WHERE key = 'dropped'")

    @property
    def next_seq(self) -> int:
        """The sequence number the next ``put`` will assign."""
        with self._lock:
            return self._scalar("SELECT value FROM meta WHERE key = 'next_seq'")

    def __len__(self) -> int:
        with self._lock:
            return self._count

    def close(self) -> None:
        """Closes the database; a checkpoint folds the WAL back so the file is self-contained."""
        with self._lock:
            with suppress(sqlite3.Error):  # closing must not fail because a checkpoint could not
                self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            self._conn.close()

    def __enter__(self) -> Outbox:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def seq_mark_path(path: Path) -> Path:
    """The file beside the outbox that bounds the seqs it may have used."""
    return path.with_name(path.name + ".seq")


def read_seq_mark(path: Path) -> int:
    """The reserved seq bound of the outbox at ``path``; 0 when unknown (missing or unreadable)."""
    try:
        return max(0, int(seq_mark_path(path).read_text().strip()))
    except (OSError, ValueError):
        return 0


def _translate(exc: sqlite3.Error, path: Path) -> OutboxError:
    """Maps sqlite errors onto the outbox's error family: corrupt (fatal) or anything else."""
    # The primary result code is the low byte of an extended one (SQLITE_CORRUPT_INDEX etc.).
    code = getattr(exc, "sqlite_errorcode", None)
    if code is not None and code & 0xFF in (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB):
        return OutboxCorruptError(f"telemetry outbox {path} is not a usable database: {exc}")
    return OutboxError(f"telemetry outbox {path}: {exc}")
