"""Device presence: whether each device is connected to the broker, from its retained Presence.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-22 13:40:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | Sequence[str] | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # The server default fills existing rows: a device is offline until its next Presence.
    with op.batch_alter_table("device", schema=None) as batch_op:
        batch_op.add_column(sa.Column("online", sa.Boolean(), server_default=sa.false(), nullable=False))
        batch_op.add_column(sa.Column("presence_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("device", schema=None) as batch_op:
        batch_op.drop_column("presence_at")
        batch_op.drop_column("online")
