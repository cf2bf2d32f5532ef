"""Brings a database made by an earlier edgefleet up to the current tables, until there are
migrations.

``create_all`` makes missing tables but never alters existing ones. What a newer version added
to an existing table, and what a new table must learn from older rows, is done here: once,
idempotently, on SQLite and PostgreSQL alike.
"""

from __future__ import annotations

from sqlalchemy import inspect, text
from sqlalchemy.engine import Connection, Engine
from sqlmodel import SQLModel

from controlplane.db import models  # noqa: F401  (registers the tables on SQLModel.metadata)


def create_or_upgrade(engine: Engine) -> None:
    """Creates missing tables, then upgrades the existing ones."""
    before = set(inspect(engine).get_table_names())
    SQLModel.metadata.create_all(engine)
    if "device" not in before:
        return  # a new database: create_all made everything as it is now
    with engine.begin() as conn:
        _add_device_models_column(conn)
        if "devicemodel" not in before:
            _backfill_device_models(conn)


def _add_device_models_column(conn: Connection) -> None:
    """Device.models (what the device reports it holds) came with several models per device."""
    columns = {c["name"] for c in inspect(conn).get_columns("device")}
    if "models" not in columns:
        conn.execute(text("ALTER TABLE device ADD COLUMN models JSON NOT NULL DEFAULT '[]'"))


def _backfill_device_models(conn: Connection) -> None:
    """Before several models per device, a device's one model was its desired bundle. Without
    this row, its next deployment of another name would sign targets that drop that model."""
    conn.execute(
        text(
            "INSERT INTO devicemodel (device_id, name, bundle_id) "
            "SELECT device.id, bundle.name, bundle.id FROM device "
            "JOIN bundle ON bundle.id = device.desired_bundle_id"
        )
    )
