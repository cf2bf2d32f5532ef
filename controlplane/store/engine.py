"""Engine creation: one place that knows the SQLite and PostgreSQL specifics."""

from __future__ import annotations

from sqlalchemy import event
from sqlalchemy.engine import Engine
from sqlmodel import create_engine

from edgefleet.controlplane.store.migrate import migrate


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
            cur.execute("PRAGMA journal_mode=WAL")
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
