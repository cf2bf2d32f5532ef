"""Database access of the rollout engine and the rollout RPCs: rollouts, their devices, the
devices a selector matches, and the inference summaries the gates read.

Functions take the caller's session and leave committing to it, as the control plane's store modules do.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime

from sqlmodel import Session, col, func, select

from edgefleet.controlplane.rollouts import states
from edgefleet.controlplane.store.errors import StoreError
from edgefleet.controlplane.store.models import Device, Rollout, RolloutDevice, TelemetryRecord, utcnow
from edgefleet.protos.fleet import selectors
from edgefleet.protos.fleet.v1 import common_pb2

REASON_LENGTH = 500
FAILED_TO_LOAD = frozenset({common_pb2.DEVICE_STATE_FAILED, common_pb2.DEVICE_STATE_ROLLED_BACK})


class RolloutNotFound(StoreError):
    """No rollout with that id or name."""


def get_rollout(
    session: Session, *, rollout_id: int | None = None, name: str | None = None, lock: bool = False
) -> Rollout:
    """The rollout by id or name; ``lock`` takes its row lock, which serializes the engine's
    step and operators' control of one rollout (on SQLite the write lock does)."""
    query = select(Rollout)
    query = (
        query.where(Rollout.id == rollout_id) if rollout_id is not None else query.where(Rollout.name == name)
    )
    if lock:
        query = query.with_for_update()
    rollout = session.exec(query).first()
    if rollout is None:
        raise RolloutNotFound(
            f"no rollout {name!r}" if rollout_id is None else f"no rollout with id {rollout_id}"
        )
    return rollout


def list_rollouts(session: Session) -> Sequence[Rollout]:
    return session.exec(select(Rollout).order_by(col(Rollout.id))).all()


def active_rollouts(session: Session) -> Sequence[Rollout]:
    return session.exec(select(Rollout).where(col(Rollout.state).in_(states.ACTIVE))).all()


def rollouts_to_drive(session: Session) -> list[int]:
    """Rollouts the engine has work on: running or paused ones, and rolled-back ones with a
    device still to put back (a rollback interrupted by a restart, say)."""
    active = session.exec(
        select(Rollout.id).where(col(Rollout.state).in_(states.ACTIVE)).order_by(col(Rollout.id))
    ).all()
    unfinished = session.exec(
        select(RolloutDevice.rollout_id)
        .join(Rollout, col(Rollout.id) == col(RolloutDevice.rollout_id))
        .where(Rollout.state == states.ROLLED_BACK)
        .where(col(RolloutDevice.state).in_(states.CHANGED), col(RolloutDevice.generation) > 0)
        .distinct()
    ).all()
    return sorted({i for i in active if i is not None} | set(unfinished))


def rollout_devices(session: Session, rollout_id: int) -> list[RolloutDevice]:
    return list(
        session.exec(
            select(RolloutDevice)
            .where(RolloutDevice.rollout_id == rollout_id)
            .order_by(col(RolloutDevice.wave), col(RolloutDevice.device_id))
        ).all()
    )


def device_counts(session: Session, rollout_ids: Iterable[int]) -> dict[int, Counter[tuple[int, int]]]:
    """Per rollout, how many devices each (wave, device state) has, counted by the database."""
    ids = list(rollout_ids)
    counts: dict[int, Counter[tuple[int, int]]] = defaultdict(Counter)
    if not ids:
        return counts
    rows = session.exec(
        select(RolloutDevice.rollout_id, RolloutDevice.wave, RolloutDevice.state, func.count())
        .where(col(RolloutDevice.rollout_id).in_(ids))
        .group_by(col(RolloutDevice.rollout_id), col(RolloutDevice.wave), col(RolloutDevice.state))
    ).all()
    for rollout_id, wave, state, n in rows:
        counts[rollout_id][(wave, state)] = n
    return counts


def matching_device_ids(session: Session, selector: Mapping[str, str]) -> list[str]:
    """Unrevoked devices whose labels include the selector, sorted by id. Labels are JSON, which
    SQLite and PostgreSQL query differently, so the match is made here."""
    rows = session.exec(select(Device.id, Device.labels).where(col(Device.revoked_at).is_(None))).all()
    return sorted(device_id for device_id, labels in rows if selectors.matches(labels, selector))


def devices(session: Session, device_ids: Iterable[str]) -> dict[str, Device]:
    ids = sorted(set(device_ids))
    if not ids:
        return {}
    return {d.id: d for d in session.exec(select(Device).where(col(Device.id).in_(ids))).all()}


def inference_rows(session: Session, device_ids: Iterable[str], since: datetime) -> list[TelemetryRecord]:
    """The inference summaries of these devices that ended at or after ``since``, oldest first."""
    ids = sorted(set(device_ids))
    if not ids:
        return []
    return list(
        session.exec(
            select(TelemetryRecord)
            .where(TelemetryRecord.kind == "inference", col(TelemetryRecord.device_id).in_(ids))
            .where(col(TelemetryRecord.time) >= since)
            .order_by(col(TelemetryRecord.time))
        ).all()
    )


def overlapping(selector: Mapping[str, str], other: Mapping[str, str]) -> bool:
    """Whether a device could match both selectors: unless they require different values of
    one key, a device with both sets of labels matches both."""
    return all(other[k] == v for k, v in selector.items() if k in other)


def record_device_report(
    session: Session, *, device_id: str, generation: int, state: int, error: str
) -> None:
    """What a device's status report means for the rollouts that assigned it a generation:
    a report that it applied one stamps ``applied_at`` (when a config took effect, which the
    gates need to the second); a report that it failed to load or test one marks that rollout's
    device FAILED, with the device's error as the reason.

    Called from DeviceService.ReportStatus, the only place that knows which generation a report
    is about: the device row keeps only its latest state, which may be a failure of an older
    generation when the engine looks. Whether a device applied is still the engine's call
    (from the device row), so a lost report does not stall a rollout.
    """
    if generation <= 0 or (state not in FAILED_TO_LOAD and state not in states.DEVICE_APPLIED):
        return
    query = select(RolloutDevice).where(
        RolloutDevice.device_id == device_id,
        RolloutDevice.state == states.UPDATING,
        col(RolloutDevice.generation) > 0,
    )
    if state in FAILED_TO_LOAD:
        query = query.where(RolloutDevice.generation == generation)
    else:
        query = query.where(
            col(RolloutDevice.generation) <= generation, col(RolloutDevice.applied_at).is_(None)
        )
    now = utcnow()
    for row in session.exec(query).all():
        if state in FAILED_TO_LOAD:
            row.state = states.FAILED
            row.reason = f"load failure: {error or 'the device gave no reason'}"[:REASON_LENGTH]
        else:
            row.applied_at = now
        row.updated_at = now
        session.add(row)
