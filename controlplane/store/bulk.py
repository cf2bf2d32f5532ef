"""Bulk writes of a change that touches many devices at once (a deploy to the fleet, a rollout
wave): one statement per table, executed once for all rows, instead of one ORM flush per device.

The statements go through the caller's session and transaction, so they commit or roll back
with the rest of the change. They bypass the ORM's unit of work, so each function first flushes
what the session holds and then expires the changed attributes of the objects the session has
loaded, so code that reads them later in the transaction reads what the database has. Because
the ORM does not know these objects changed, it would not expire them when a savepoint holding
the writes rolls back (the rollout engine's one-by-one fallback does that): ``_expire_on_rollback``
does, so they read the rolled-back values again.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from sqlalchemy import bindparam, event, insert, update
from sqlalchemy.orm import SessionTransaction, object_session
from sqlalchemy.orm.util import identity_key
from sqlmodel import Session

from edgefleet.controlplane.store.models import Deployment, Device, DeviceModel, utcnow


def set_models(
    session: Session, *, name: str, bundle_id: int, replaced: Sequence[str], added: Sequence[str]
) -> None:
    """Makes ``bundle_id`` the model ``name`` of every device in ``replaced`` (each holds a
    release of that name) and of every device in ``added`` (none holds one)."""
    session.flush()
    table = DeviceModel.__table__  # type: ignore[attr-defined]
    if replaced:
        session.execute(
            update(table)
            .where(table.c.device_id == bindparam("b_device"), table.c.name == name)
            .values(bundle_id=bundle_id),
            [{"b_device": device_id} for device_id in replaced],
        )
        for device_id in replaced:
            loaded = session.identity_map.get(identity_key(DeviceModel, (device_id, name)))
            if loaded is not None:
                session.expire(loaded, ["bundle_id"])
                _expire_on_rollback(session, [loaded])
    if added:
        session.execute(
            insert(table),
            [{"device_id": device_id, "name": name, "bundle_id": bundle_id} for device_id in added],
        )


def move_generations(
    session: Session, devices: Sequence[Device], generations: Mapping[str, int], *, bundle_id: int
) -> None:
    """Moves each of ``devices`` (loaded and locked by the caller) to its generation in
    ``generations``, with ``bundle_id`` as its most recently deployed model."""
    if not devices:
        return
    session.flush()
    table = Device.__table__  # type: ignore[attr-defined]
    session.execute(
        update(table)
        .where(table.c.id == bindparam("b_id"))
        .values(desired_generation=bindparam("b_generation"), desired_bundle_id=bundle_id),
        [{"b_id": device.id, "b_generation": generations[device.id]} for device in devices],
    )
    loaded = [device for device in devices if object_session(device) is session]
    for device in loaded:
        session.expire(device, ["desired_generation", "desired_bundle_id"])
    _expire_on_rollback(session, loaded)


_TOUCHED = "edgefleet.bulk_touched"  # session.info key: objects written behind the ORM's back


def _expire_on_rollback(session: Session, objects: Sequence[object]) -> None:
    """Expires ``objects`` whenever a transaction or savepoint of ``session`` rolls back, until
    its outermost transaction ends (expiring on a rollback of a savepoint the writes were not
    in only costs a reload)."""
    touched: list[object] | None = session.info.get(_TOUCHED)
    if touched is None:
        touched = session.info[_TOUCHED] = []
        event.listen(session, "after_soft_rollback", _expire_touched)
        event.listen(session, "after_transaction_end", _forget_touched)
    touched.extend(objects)


def _expire_touched(session: Session, _previous: object) -> None:
    for obj in session.info.get(_TOUCHED, []):
        if obj in session:
            session.expire(obj)


def _forget_touched(session: Session, transaction: SessionTransaction) -> None:
    if transaction.parent is None:  # the outermost one: a savepoint released may still roll back
        session.info.get(_TOUCHED, []).clear()


def record_deployments(session: Session, rows: Sequence[tuple[str, int, int]]) -> None:
    """Appends one Deployment row per (device id, bundle id, generation)."""
    if not rows:
        return
    now = utcnow()
    session.execute(
        insert(Deployment.__table__),  # type: ignore[attr-defined]
        [
            {"device_id": device_id, "bundle_id": bundle_id, "generation": generation, "created_at": now}
            for device_id, bundle_id, generation in rows
        ],
    )
