"""Brings the control plane's database to the newest schema at every start, with Alembic.

The revisions live in ``controlplane/store/migrations/versions`` and ship in the package, so an
installed control plane migrates itself: ``make_engine`` calls ``migrate`` on the engine it
made, before anything else touches the database. What a database gets depends on what it holds:

- nothing (a new database): every revision, from nothing to head;
- an ``alembic_version`` table: the revisions after the one it records;
- tables but no ``alembic_version``: it was made by ``create_all``, as every release before
  migrations did. It is stamped with the revision its tables are, then upgraded from there:
  - without ``devicemodel`` it predates several models per device: ``BASELINE`` (0001, the
    tables of commit 7d84947), so revision 0002 adds ``devicemodel`` and ``device.models`` and
    gives each device its one model, its desired bundle, as its first ``devicemodel`` row;
  - with the current tables exactly (autogenerate finds nothing to do): head;
  - otherwise it was made by the last release before migrations: ``LAST_CREATE_ALL`` (0002),
    and the revisions after it run.

All of it is one transaction, begun with SQLite's write lock (the engine's BEGIN IMMEDIATE) or
PostgreSQL's advisory lock: control planes starting together on one database migrate it once,
and a migration that fails leaves the database as it was. Within a process, migrations run one
at a time whatever the database: Alembic's ``op`` and ``context`` are process-wide.

SQLite changes most of a table only by copying it (Alembic's batch mode), which it allows only
with foreign keys off; they are off during the migration, as SQLite prescribes, and checked
before the commit.

Constraints keep the names the databases already have (``ix_<table>_<column>`` indexes, the
database's own names for keys), so a database made by ``create_all`` and one made by the
revisions are the same.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect, text
from sqlalchemy.engine import Connection, Engine
from sqlmodel import SQLModel

from edgefleet.controlplane.store import models  # noqa: F401  (registers the tables on SQLModel.metadata)

MIGRATIONS = Path(__file__).resolve().parent / "migrations"
BASELINE = "0001"
LAST_CREATE_ALL = "0002"
# Any constant works; it only has to be the same in every control plane.
_POSTGRES_LOCK_KEY = 0x65646765666C6565  # "edgeflee"
# Alembic's op and context proxies are module globals: two threads running its commands at once
# would send one thread's DDL down the other's connection.
_ALEMBIC_IN_THIS_PROCESS = threading.Lock()


def alembic_config(connection: Connection) -> Config:
    """Alembic's configuration without an alembic.ini: the package's scripts, and the
    connection env.py runs them on."""
    config = Config(attributes={"connection": connection})
    # ConfigParser values: a literal % is written %%.
    config.set_main_option("script_location", str(MIGRATIONS).replace("%", "%%"))
    config.set_main_option("file_template", "v%%(rev)s_%%(slug)s")  # module names mypy accepts
    return config


def migrate(engine: Engine) -> None:
    """Upgrades the database to head, stamping one made before migrations first."""
    with _ALEMBIC_IN_THIS_PROCESS, engine.connect() as conn, _sqlite_foreign_keys_off(conn), conn.begin():
        if conn.dialect.name == "postgresql":
            conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _POSTGRES_LOCK_KEY})
        config = alembic_config(conn)
        made_by_create_all = _create_all_revision(conn)
        if made_by_create_all is not None:
            command.stamp(config, made_by_create_all)
        command.upgrade(config, "head")
        if conn.dialect.name == "sqlite":
            _check_sqlite_foreign_keys(conn)


def _create_all_revision(conn: Connection) -> str | None:
    """The revision a database made by ``create_all`` before migrations is at; None for a
    database Alembic keeps, or a new one."""
    tables = set(inspect(conn).get_table_names())
    if "alembic_version" in tables or "device" not in tables:
        return None
    if "devicemodel" not in tables:
        return BASELINE
    return "head" if _matches_models(conn) else LAST_CREATE_ALL


def _matches_models(conn: Connection) -> bool:
    """Whether autogenerate finds nothing to do, compared as env.py compares."""
    context = MigrationContext.configure(conn, opts={"compare_server_default": True})
    return not compare_metadata(context, SQLModel.metadata)


@contextmanager
def _sqlite_foreign_keys_off(conn: Connection) -> Iterator[None]:
    """SQLite ignores this pragma inside a transaction, so it goes to the driver before one
    begins, and back on after, since the connection returns to the pool."""
    if conn.dialect.name != "sqlite":
        yield
        return
    cursor = conn.connection.cursor()
    try:
        cursor.execute("PRAGMA foreign_keys=OFF")
        yield
    finally:
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()


def _check_sqlite_foreign_keys(conn: Connection) -> None:
    """Refuses to commit a migration that left a row pointing nowhere (which SQLite did not
    check while foreign keys were off)."""
    broken = conn.exec_driver_sql("PRAGMA foreign_key_check").fetchall()
    if broken:
        raise RuntimeError(f"migration broke foreign keys (table, rowid, parent, fk): {broken[:5]}")
