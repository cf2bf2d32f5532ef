"""Runs blocking store work off the event loop, one transaction per call.

``run`` is the ordinary transaction: on SQLite it begins with the write lock (the engine's
BEGIN IMMEDIATE, see ``store.engine``), so every such call waits for every other writer.
``read`` is for work that only reads: on SQLite it runs on a second, read-only pool whose
transactions begin deferred, so in WAL mode it reads a snapshot beside the writer instead of
queueing behind it (PostgreSQL reads never wait for writers: there it uses the one engine).
Its calls also have threads of their own (READ_THREADS): in the shared pool of ``run`` they
would queue behind every status report waiting for the write lock.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from sqlalchemy import event
from sqlalchemy.engine import Engine
from sqlmodel import Session, create_engine

T = TypeVar("T")

READ_THREADS = 2  # reads are few and batched (one per woken batch of streams, the safety net)
SQLITE_BUSY_TIMEOUT_S = 30  # as the writing engine's: a checkpoint may briefly hold readers


def _in_memory(engine: Engine) -> bool:
    """An SQLite database that lives in one connection: a second pool would see another one."""
    database = engine.url.database or ""
    return database in ("", ":memory:") or "mode=memory" in database


def sqlite_reader(engine: Engine) -> Engine:
    """A pool on ``engine``'s SQLite file whose connections cannot write (``query_only``) and
    whose transactions begin deferred: a snapshot that takes no write lock."""
    reader = create_engine(
        engine.url, connect_args={"check_same_thread": False, "timeout": SQLITE_BUSY_TIMEOUT_S}
    )

    @event.listens_for(reader, "connect")
    def _read_only(dbapi_conn: Any, _record: Any) -> None:
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA query_only=ON")
        cur.close()
        dbapi_conn.isolation_level = None  # the begin event below issues BEGIN

    @event.listens_for(reader, "begin")
    def _begin_deferred(conn: Any) -> None:
        conn.exec_driver_sql("BEGIN")

    return reader


class Database:
    """Gives async servicers a transaction in a worker thread, so SQL never blocks grpc.aio."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._reader: Engine | None = None
        self._reader_lock = threading.Lock()
        self._read_threads: ThreadPoolExecutor | None = None

    def run_sync(self, work: Callable[[Session], T]) -> T:
        with Session(self.engine, expire_on_commit=False) as session, session.begin():
            return work(session)

    async def run(self, work: Callable[[Session], T]) -> T:
        return await asyncio.to_thread(self.run_sync, work)

    def reader_engine(self) -> Engine:
        """The engine ``read`` uses: the read-only SQLite pool, made on first use, else ``engine``."""
        if self.engine.dialect.name != "sqlite" or _in_memory(self.engine):
            return self.engine
        with self._reader_lock:
            if self._reader is None:
                self._reader = sqlite_reader(self.engine)
            return self._reader

    def read_sync(self, work: Callable[[Session], T]) -> T:
        """Runs ``work`` in a transaction that only reads (on SQLite, one that cannot write)."""
        with Session(self.reader_engine(), expire_on_commit=False) as session, session.begin():
            return work(session)

    async def read(self, work: Callable[[Session], T]) -> T:
        with self._reader_lock:
            if self._read_threads is None:
                self._read_threads = ThreadPoolExecutor(READ_THREADS, thread_name_prefix="db-read")
            threads = self._read_threads
        return await asyncio.get_running_loop().run_in_executor(threads, self.read_sync, work)

    def dispose(self) -> None:
        """Stops the read threads and closes the read-only pool's connections (the writing
        engine is its owner's)."""
        with self._reader_lock:
            threads, self._read_threads = self._read_threads, None
            reader, self._reader = self._reader, None
        if threads is not None:
            threads.shutdown(wait=True)
        if reader is not None:
            reader.dispose()
