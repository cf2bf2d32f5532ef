"""Baseline: the tables of commit 7d84947, before several models per device.

They are what create_all made then, to the text SQLite keeps and pg_dump prints. A database
made by that create_all has no alembic_version; edgefleet.controlplane.store.migrate stamps it with this
revision instead of running it.

Revision ID: 0001
Revises:
Create Date: 2026-11-22 12:54:14.969595
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "auditentry",
        sa.Column("seq", sa.Integer(), nullable=False),
        sa.Column("time", sa.DateTime(timezone=True), nullable=False),
        sa.Column("actor", sa.String(length=128), nullable=False),
        sa.Column("action", sa.String(length=64), nullable=False),
        sa.Column("target", sa.String(length=256), nullable=False),
        sa.Column("outcome", sa.String(length=16), nullable=False),
        sa.Column("detail", sa.JSON(), nullable=False),
        sa.Column("prev_hash", sa.String(length=64), nullable=False),
        sa.Column("hash", sa.String(length=64), nullable=False),
        sa.PrimaryKeyConstraint("seq"),
    )
    with op.batch_alter_table("auditentry", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_auditentry_action"), ["action"], unique=False)
        batch_op.create_index(batch_op.f("ix_auditentry_actor"), ["actor"], unique=False)
        batch_op.create_index(batch_op.f("ix_auditentry_target"), ["target"], unique=False)

    op.create_table(
        "bundle",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=128), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("release_metadata", sa.LargeBinary(), nullable=False),
        sa.Column("manifest_json", sa.String(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("total_bytes", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("name", "version"),
    )
    with op.batch_alter_table("bundle", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_bundle_name"), ["name"], unique=False)

    op.create_table(
        "enrollmenttoken",
        sa.Column("token_sha256", sa.String(length=64), nullable=False),
        sa.Column("uses_left", sa.Integer(), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("labels", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("token_sha256"),
    )
    op.create_table(
        "operatortoken",
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("token_sha256", sa.String(length=64), nullable=False),
        sa.Column("role", sa.String(length=16), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("name"),
    )
    with op.batch_alter_table("operatortoken", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_operatortoken_token_sha256"), ["token_sha256"], unique=True)

    op.create_table(
        "telemetryrecord",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("device_id", sa.String(length=64), nullable=False),
        sa.Column("kind", sa.String(length=32), nullable=False),
        sa.Column("seq", sa.Integer(), nullable=False),
        sa.Column("time", sa.DateTime(timezone=True), nullable=False),
        sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("payload", sa.JSON(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("device_id", "seq"),
    )
    with op.batch_alter_table("telemetryrecord", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_telemetryrecord_device_id"), ["device_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_telemetryrecord_kind"), ["kind"], unique=False)

    op.create_table(
        "tufmetadata",
        sa.Column("repository", sa.String(length=16), nullable=False),
        sa.Column("device_id", sa.String(length=64), nullable=False),
        sa.Column("role", sa.String(length=16), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("data", sa.LargeBinary(), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("repository", "device_id", "role", "version"),
    )
    op.create_table(
        "variantpinrule",
        sa.Column("scope", sa.String(length=512), nullable=False),
        sa.Column("device_id", sa.String(length=64), nullable=True),
        sa.Column("selector", sa.JSON(), nullable=False),
        sa.Column("variant_id", sa.String(length=128), nullable=False),
        sa.Column("format", sa.Integer(), nullable=False),
        sa.Column("set_by", sa.String(length=128), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("scope"),
    )
    with op.batch_alter_table("variantpinrule", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_variantpinrule_device_id"), ["device_id"], unique=False)

    op.create_table(
        "bundleartifact",
        sa.Column("bundle_id", sa.Integer(), nullable=False),
        sa.Column("path", sa.String(length=512), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("length", sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(["bundle_id"], ["bundle.id"]),
        sa.PrimaryKeyConstraint("bundle_id", "path"),
    )
    with op.batch_alter_table("bundleartifact", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_bundleartifact_sha256"), ["sha256"], unique=False)

    op.create_table(
        "device",
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("enrollment_sha256", sa.String(length=64), nullable=False),
        sa.Column("hostname", sa.String(), nullable=False),
        sa.Column("labels", sa.JSON(), nullable=False),
        sa.Column("enrolled_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_seen", sa.DateTime(timezone=True), nullable=True),
        sa.Column("state", sa.Integer(), nullable=False),
        sa.Column("active_bundle", sa.String(), nullable=False),
        sa.Column("active_version", sa.Integer(), nullable=False),
        sa.Column("variant", sa.String(), nullable=False),
        sa.Column("api_url", sa.String(), nullable=False),
        sa.Column("last_error", sa.String(), nullable=False),
        sa.Column("desired_bundle_id", sa.Integer(), nullable=True),
        sa.Column("desired_generation", sa.Integer(), nullable=False),
        sa.Column("applied_generation", sa.Integer(), nullable=False),
        sa.Column("last_tokens_per_second", sa.Float(), nullable=False),
        sa.Column("last_latency_ms", sa.Float(), nullable=False),
        sa.Column("requests_total", sa.Integer(), nullable=False),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("selection_reason", sa.String(), nullable=False),
        sa.ForeignKeyConstraint(["desired_bundle_id"], ["bundle.id"]),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("device", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_device_enrollment_sha256"), ["enrollment_sha256"], unique=False)

    op.create_table(
        "deployment",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("device_id", sa.String(), nullable=False),
        sa.Column("bundle_id", sa.Integer(), nullable=False),
        sa.Column("generation", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        # In create_all's order, so SQLite's stored DDL is the same text.
        sa.ForeignKeyConstraint(["device_id"], ["device.id"]),
        sa.ForeignKeyConstraint(["bundle_id"], ["bundle.id"]),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("deployment", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_deployment_device_id"), ["device_id"], unique=False)

    op.create_table(
        "devicecertificate",
        sa.Column("serial", sa.String(length=40), nullable=False),
        sa.Column("device_id", sa.String(length=64), nullable=False),
        sa.Column("issued_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("not_after", sa.DateTime(timezone=True), nullable=False),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(["device_id"], ["device.id"]),
        sa.PrimaryKeyConstraint("serial"),
    )
    with op.batch_alter_table("devicecertificate", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_devicecertificate_device_id"), ["device_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_devicecertificate_revoked_at"), ["revoked_at"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("devicecertificate", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_devicecertificate_revoked_at"))
        batch_op.drop_index(batch_op.f("ix_devicecertificate_device_id"))

    op.drop_table("devicecertificate")
    with op.batch_alter_table("deployment", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_deployment_device_id"))

    op.drop_table("deployment")
    with op.batch_alter_table("device", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_device_enrollment_sha256"))

    op.drop_table("device")
    with op.batch_alter_table("bundleartifact", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_bundleartifact_sha256"))

    op.drop_table("bundleartifact")
    with op.batch_alter_table("variantpinrule", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_variantpinrule_device_id"))

    op.drop_table("variantpinrule")
    op.drop_table("tufmetadata")
    with op.batch_alter_table("telemetryrecord", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_telemetryrecord_kind"))
        batch_op.drop_index(batch_op.f("ix_telemetryrecord_device_id"))

    op.drop_table("telemetryrecord")
    with op.batch_alter_table("operatortoken", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_operatortoken_token_sha256"))

    op.drop_table("operatortoken")
    op.drop_table("enrollmenttoken")
    with op.batch_alter_table("bundle", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_bundle_name"))

    op.drop_table("bundle")
    with op.batch_alter_table("auditentry", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_auditentry_target"))
        batch_op.drop_index(batch_op.f("ix_auditentry_actor"))
        batch_op.drop_index(batch_op.f("ix_auditentry_action"))

    op.drop_table("auditentry")
