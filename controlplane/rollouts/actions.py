"""What a rollout does to one device: assign it the change, or put it back on what it ran before.

Both go the way an operator's own changes go — the store moves the device to a new generation and
records it, controlplane/fleet/director.py signs its director targets with all of its models,
its pin and its config — inside the engine's transaction, so the rollout's record of the device
(RolloutDevice) and the device's assignment commit together or not at all. That is what makes a
restarted engine never assign a device twice: a device with a generation from this rollout is
done, whatever happened after the commit.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from sqlmodel import Session

from edgefleet.controlplane.fleet import director
from edgefleet.controlplane.rollouts import states
from edgefleet.controlplane.rollouts.store import REASON_LENGTH
from edgefleet.controlplane.store import deployments
from edgefleet.controlplane.store.deployments import DeployedTo
from edgefleet.controlplane.store.models import (
    Bundle,
    Device,
    DeviceModel,
    Rollout,
    RolloutDevice,
    VariantPinRule,
)
from edgefleet.controlplane.store.pins import effective_pin
from edgefleet.controlplane.trust.repositories import Repositories


@dataclass(frozen=True, slots=True)
class Change:
    """A rollout's change: a release (``bundle``) or, without one, ``config`` (stored form)."""

    bundle: Bundle | None
    config: dict[str, object]

    @classmethod
    def of(cls, session: Session, rollout: Rollout) -> Change:
        bundle = session.get(Bundle, rollout.bundle_id) if rollout.bundle_id is not None else None
        return cls(bundle=bundle, config=dict(rollout.config or {}))


def _sign(
    session: Session,
    repositories: Repositories,
    pins: Sequence[VariantPinRule],
    device: Device,
    moved: DeployedTo,
) -> None:
    director.sign(
        session,
        repositories,
        device=device,
        generation=moved.generation,
        releases=moved.releases,
        pin=director.pin_message(effective_pin(pins, device)),
    )


def assign(
    session: Session,
    repositories: Repositories,
    *,
    change: Change,
    row: RolloutDevice,
    pins: Sequence[VariantPinRule],
    now: datetime,
) -> None:
    """Assigns the change to the row's device at a new generation and records what it had
    before: the release of the same bundle name (None: it held none), or its config."""
    device = session.get(Device, row.device_id)
    assert device is not None
    if change.bundle is not None:
        held = session.get(DeviceModel, (device.id, change.bundle.name))
        row.previous_bundle_id = held.bundle_id if held is not None else None
        moved = deployments.deploy(session, bundle=change.bundle, device_ids=[device.id])[0]
    else:
        row.previous_config = dict(device.config)
        moved = deployments.set_config(session, device_id=device.id, config=change.config)
    _sign(session, repositories, pins, device, moved)
    row.generation = moved.generation
    row.state = states.UPDATING
    row.assigned_at = row.updated_at = now
    session.add(row)


def assign_release(
    session: Session,
    repositories: Repositories,
    *,
    bundle: Bundle,
    rows: Sequence[RolloutDevice],
    pins: Sequence[VariantPinRule],
    now: datetime,
) -> None:
    """``assign`` of a release to many rows' devices at once: one deploy
    (``deployments.deploy``: a few bulk statements) and one batch of signatures
    (``director.sign_changed``), so a wave of thousands costs a few statements, not a few
    per device. Raises what they raise, having recorded nothing on the rows."""
    device_ids = [row.device_id for row in rows]
    previous = deployments.held_bundle_ids(session, name=bundle.name, device_ids=device_ids)
    moved = deployments.deploy(session, bundle=bundle, device_ids=device_ids)
    director.sign_changed(session, repositories, moved, pins=pins)
    generations = {m.device_id: m.generation for m in moved}
    for row in rows:
        row.previous_bundle_id = previous.get(row.device_id)
        row.generation = generations[row.device_id]
        row.state = states.UPDATING
        row.assigned_at = row.updated_at = now
        session.add(row)


def _still_on_change(session: Session, change: Change, device: Device) -> str | None:
    """None when the device still runs the rollout's change; else what replaced it since."""
    if change.bundle is not None:
        held = session.get(DeviceModel, (device.id, change.bundle.name))
        if held is not None and held.bundle_id == change.bundle.id:
            return None
        now_on = session.get(Bundle, held.bundle_id) if held is not None else None
        return f"{now_on.name}@{now_on.version}" if now_on else f"no {change.bundle.name}"
    return None if device.config == change.config else "another config"


def roll_back(
    session: Session,
    repositories: Repositories,
    *,
    change: Change,
    row: RolloutDevice,
    pins: Sequence[VariantPinRule],
    now: datetime,
) -> bool:
    """Puts the row's device back on what it ran before the rollout, at a new generation: the
    previous release of the bundle name (or none: the model is removed), or the previous config.

    A device that no longer runs the rollout's change (an operator deployed something else
    since) or was revoked is left as it is: the rollout's change is already gone from it, or the
    device from the fleet. Returns whether the device was re-assigned (and needs a nudge).
    """
    device = session.get(Device, row.device_id)
    replaced = None if device is None else _still_on_change(session, change, device)
    reassigned = False
    if device is None or device.revoked_at is not None:
        note = "device revoked; nothing to put back"
    elif replaced is not None:
        note = f"left as it is: it runs {replaced} since"
    else:
        if change.bundle is None:
            moved = deployments.set_config(session, device_id=device.id, config=row.previous_config or {})
        elif row.previous_bundle_id is not None:
            previous = session.get(Bundle, row.previous_bundle_id)
            assert previous is not None
            moved = deployments.deploy(session, bundle=previous, device_ids=[device.id])[0]
        else:
            moved = deployments.undeploy(session, name=change.bundle.name, device_ids=[device.id])[0]
        _sign(session, repositories, pins, device, moved)
        row.rollback_generation = moved.generation
        note = f"rolled back at generation {moved.generation}"
        reassigned = True
    row.reason = (f"{row.reason}; {note}" if row.reason else note)[:REASON_LENGTH]
    row.state = states.DEVICE_ROLLED_BACK
    row.updated_at = now
    session.add(row)
    return reassigned
