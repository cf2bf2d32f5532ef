"""Blobs in PostgreSQL large objects: ``blob`` maps an artifact's sha256 to its length and the
large object holding its bytes (``store.blob_postgres``), so every replica sharing a PostgreSQL
database serves every artifact. A row is written in the transaction that wrote and verified the
bytes. The table exists on SQLite too (models and migrations agree on both) but stays empty
there: one node keeps its blobs in its directory.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-07 07:30:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | Sequence[str] | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "blob",
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("length", sa.BigInteger(), nullable=False),
        sa.Column("loid", sa.BigInteger(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("sha256"),
        sa.UniqueConstraint("loid"),
    )


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("SELECT lo_unlink(loid) FROM blob")
    op.drop_table("blob")
