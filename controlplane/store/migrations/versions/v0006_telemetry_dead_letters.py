"""Telemetry dead letters, and 64-bit telemetry sequence numbers and counters.

``telemetrydeadletter`` keeps the messages ingestion acknowledged without storing them (refused
by its checks or by the database), with the reason and an excerpt of the payload.
``telemetryrecord.seq``, ``device.requests_total`` and the hourly rollups' counters carry (sums
of) protobuf uint64 values: INTEGER is 32-bit on PostgreSQL, so all become BIGINT (ingestion
refuses values beyond it, retention saturates its sums at it); one absurd record would otherwise
fail every retention pass that folds it. SQLite's INTEGER already holds 64 bits, and changing
the declared type there would copy whole tables, so SQLite keeps its columns as they are.

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-23 09:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | Sequence[str] | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_ROLLUP_COUNTERS = ("records", "requests", "errors", "prompt_tokens", "completion_tokens", "decode_tokens")
_WIDENED = (
    ("telemetryrecord", "seq"),
    ("device", "requests_total"),
    *(("telemetryrollup", column) for column in _ROLLUP_COUNTERS),
)


def upgrade() -> None:
    op.create_table(
        "telemetrydeadletter",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("topic", sa.String(length=256), nullable=False),
        sa.Column("device_id", sa.String(length=64), nullable=False),
        sa.Column("reason", sa.String(length=32), nullable=False),
        sa.Column("detail", sa.String(length=1024), nullable=False),
        sa.Column("payload_bytes", sa.BigInteger(), nullable=False),
        sa.Column("payload_sha256", sa.String(length=64), nullable=False),
        sa.Column("excerpt", sa.LargeBinary(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    for column in ("received_at", "device_id", "reason"):
        op.create_index(
            op.f(f"ix_telemetrydeadletter_{column}"), "telemetrydeadletter", [column], unique=False
        )
    if op.get_bind().dialect.name != "sqlite":
        for table, column in _WIDENED:
            op.alter_column(
                table, column, type_=sa.BigInteger(), existing_type=sa.Integer(), existing_nullable=False
            )


def downgrade() -> None:
    if op.get_bind().dialect.name != "sqlite":
        for table, column in _WIDENED:
            op.alter_column(
                table, column, type_=sa.Integer(), existing_type=sa.BigInteger(), existing_nullable=False
            )
    for column in ("reason", "device_id", "received_at"):
        op.drop_index(op.f(f"ix_telemetrydeadletter_{column}"), table_name="telemetrydeadletter")
    op.drop_table("telemetrydeadletter")
