"""Hourly telemetry rollups: raw rows past retention are folded into them (telemetry/retention.py).

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-22 13:20:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | Sequence[str] | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "telemetryrollup",
        sa.Column("device_id", sa.String(length=64), nullable=False),
        sa.Column("kind", sa.String(length=32), nullable=False),
        sa.Column("hour", sa.DateTime(timezone=True), nullable=False),
        sa.Column("records", sa.Integer(), nullable=False),
        sa.Column("requests", sa.Integer(), nullable=False),
        sa.Column("errors", sa.Integer(), nullable=False),
        sa.Column("prompt_tokens", sa.Integer(), nullable=False),
        sa.Column("completion_tokens", sa.Integer(), nullable=False),
        sa.Column("decode_tokens", sa.Integer(), nullable=False),
        sa.Column("decode_seconds", sa.Float(), nullable=False),
        sa.Column("latency_ms_p95_max", sa.Float(), nullable=False),
        sa.Column("rss_bytes_max", sa.BigInteger(), nullable=False),
        sa.Column("cpu_percent_sum", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("device_id", "kind", "hour"),
    )


def downgrade() -> None:
    op.drop_table("telemetryrollup")
