"""Several models per device: the devicemodel table and device.models, backfilled.

Before this a device held one model, its desired bundle; devicemodel holds every model a device
is assigned, so each device's desired bundle becomes its first row there. Without that row,
the device's next deployment of another name would sign targets that drop the model it runs.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-22 12:54:17.902354
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | Sequence[str] | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "devicemodel",
        sa.Column("device_id", sa.String(length=64), nullable=False),
        sa.Column("name", sa.String(length=128), nullable=False),
        sa.Column("bundle_id", sa.Integer(), nullable=False),
        # In create_all's order, so SQLite's stored DDL is the same text.
        sa.ForeignKeyConstraint(["device_id"], ["device.id"]),
        sa.ForeignKeyConstraint(["bundle_id"], ["bundle.id"]),
        sa.PrimaryKeyConstraint("device_id", "name"),
    )
    with op.batch_alter_table("devicemodel", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_devicemodel_bundle_id"), ["bundle_id"], unique=False)

    # The rows already there get "[]" from a server default, dropped again because models.py
    # has none. Two batches: on SQLite the second copies the table, and the copy must find the
    # column filled.
    with op.batch_alter_table("device", schema=None) as batch_op:
        batch_op.add_column(sa.Column("models", sa.JSON(), nullable=False, server_default="[]"))
    with op.batch_alter_table("device", schema=None) as batch_op:
        batch_op.alter_column("models", existing_type=sa.JSON(), existing_nullable=False, server_default=None)

    op.execute(
        "INSERT INTO devicemodel (device_id, name, bundle_id) "
        "SELECT device.id, bundle.name, bundle.id FROM device "
        "JOIN bundle ON bundle.id = device.desired_bundle_id"
    )


def downgrade() -> None:
    with op.batch_alter_table("device", schema=None) as batch_op:
        batch_op.drop_column("models")

    with op.batch_alter_table("devicemodel", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_devicemodel_bundle_id"))

    op.drop_table("devicemodel")
