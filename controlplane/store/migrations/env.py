"""Alembic's environment for the control plane's database, run by every Alembic command.

It never connects on its own: ``edgefleet.controlplane.store.migrate`` hands it the connection it opened in
``config.attributes["connection"]`` (Alembic's cookbook pattern for sharing a connection), so
migrations run inside the caller's transaction, with the engine's SQLite settings, on whatever
database the control plane was given. There is no offline (``--sql``) mode.
"""

from __future__ import annotations

from typing import Any, Literal

from alembic import context
from alembic.autogenerate.api import AutogenContext
from sqlalchemy import BigInteger, Integer
from sqlalchemy.engine import Connection
from sqlalchemy.types import TypeDecorator, TypeEngine
from sqlmodel import SQLModel

from edgefleet.controlplane.store import models  # noqa: F401  (registers the tables on SQLModel.metadata)


def render_item(type_: str, obj: Any, autogen_context: AutogenContext) -> str | Literal[False]:
    """Writes SQLModel's column types (AutoString, UTCDateTime) as the SQLAlchemy types they
    wrap, which are what the database holds: revisions then import no sqlmodel and stay
    valid whatever sqlmodel does to its types later."""
    if type_ == "type" and isinstance(obj, TypeDecorator) and type(obj).__module__.startswith("sqlmodel."):
        return f"sa.{obj.impl!r}"
    return False


def compare_type(
    ctx: Any, inspected: Any, metadata: Any, inspected_type: TypeEngine[Any], metadata_type: TypeEngine[Any]
) -> bool | None:
    """INTEGER and BIGINT are one type on SQLite (64-bit integers either way), so a column
    widened to BIGINT in models.py is no difference there (revision 0006 widens it on
    PostgreSQL only, instead of copying SQLite's telemetry table); None: Alembic's own compare."""
    if (
        ctx.dialect.name == "sqlite"
        and isinstance(inspected_type, Integer)
        and isinstance(metadata_type, BigInteger | Integer)
    ):
        return False
    return None


def run_migrations() -> None:
    connection = context.config.attributes.get("connection")
    if context.is_offline_mode() or not isinstance(connection, Connection):
        raise RuntimeError(
            "run Alembic through edgefleet.controlplane.store.migrate, which passes a connection"
        )
    context.configure(
        connection=connection,
        target_metadata=SQLModel.metadata,
        # SQLite alters most of a table only by copying it; batch mode writes that, and plain
        # ALTERs on PostgreSQL.
        render_as_batch=True,
        render_item=render_item,
        compare_server_default=True,  # "no differences" must cover defaults too
        compare_type=compare_type,
    )
    with context.begin_transaction():
        context.run_migrations()


run_migrations()
