"""Engine creation: one place that knows the SQLite and PostgreSQL specifics."""

from __future__ import annotations

import sqlite3

from sqlalchemy import event
from sqlalchemy.engine import Engine
from sqlmodel import create_engine
from tenacity import retry, retry_if_exception_type, stop_after_delay, wait_random_exponential

from edgefleet.controlplane.store.migrate import migrate


@retry(
    retry=retry_if_exception_type(sqlite3.OperationalError),
    wait=wait_random_exponential(multiplier=0.05, max=1.0),
    stop=stop_after_delay(30),
    reraise=True,
)
def _use_wal(cursor: sqlite3.Cursor) -> None:
    """Switches the database file to WAL unless it is already (the mode is kept in the file).
    The switch needs a lock SQLite does not wait for with its busy timeout: two control planes
    opening one new file at once saw "database is locked" at once, so it is retried, bounded."""
    if cursor.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
        cursor.execute("PRAGMA journal_mode=WAL")


def make_engine(url: str) -> Engine:
    """Creates the engine and brings the database to the current schema (see `migrate`).

    SQLite gets WAL, a busy timeout, and transactions that take the write lock when they
    begin (BEGIN IMMEDIATE): a transaction that reads and then writes (the audit chain, token
    use, deployments) would otherwise fail when another writer committed in between.
    """
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn, _record):  # type: ignore[no-untyped-def]
            cur = dbapi_conn.cursor()
            _use_wal(cur)
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()
            dbapi_conn.isolation_level = None  # SQLAlchemy's begin event below issues BEGIN

        @event.listens_for(engine, "begin")
        def _sqlite_begin_immediate(conn):  # type: ignore[no-untyped-def]
            conn.exec_driver_sql("BEGIN IMMEDIATE")
    else:
        engine = create_engine(url, pool_pre_ping=True)
    migrate(engine)
    return engine
