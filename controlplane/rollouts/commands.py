"""What operators do to rollouts — create, pause, resume, abort, roll back — and how they read
them, each inside the caller's transaction with its audit entry. The RPCs
(controlplane/api/operator_service.py) only authorize and map the errors here to codes.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

from sqlmodel import Session, col, select

from edgefleet.controlplane.fleet import audit
from edgefleet.controlplane.rollouts import convert, states, store, waves
from edgefleet.controlplane.rollouts.convert import RolloutSpec
from edgefleet.controlplane.rollouts.engine import RolloutMachine
from edgefleet.controlplane.store.bundles import get_bundle
from edgefleet.controlplane.store.errors import StoreError
from edgefleet.controlplane.store.models import Bundle, Rollout, utcnow
from edgefleet.protos.fleet import selectors
from edgefleet.protos.fleet.v1 import operator_pb2


class RolloutExists(StoreError):
    """A rollout with that name exists (names are unique, rollouts are kept as history)."""


class RolloutConflict(StoreError):
    """The rollout cannot start: no device matches, or an active rollout changes the same thing
    on devices both selectors can match."""


class ImpossibleTransition(StoreError):
    """The rollout's state does not allow that action."""


@dataclass(frozen=True, slots=True)
class Transition:
    verb: str  # as in the audit action and messages
    allowed: frozenset[int]
    to: int


TRANSITIONS = {
    operator_pb2.ROLLOUT_ACTION_PAUSE: Transition("pause", frozenset({states.RUNNING}), states.PAUSED),
    operator_pb2.ROLLOUT_ACTION_RESUME: Transition("resume", frozenset({states.PAUSED}), states.RUNNING),
    operator_pb2.ROLLOUT_ACTION_ABORT: Transition("abort", states.ACTIVE, states.ABORTED),
    operator_pb2.ROLLOUT_ACTION_ROLLBACK: Transition(
        "rollback",
        frozenset({states.RUNNING, states.PAUSED, states.ABORTED, states.COMPLETED}),
        states.ROLLED_BACK,
    ),
}
REASONS = {states.PAUSED: "paused", states.ABORTED: "aborted", states.ROLLED_BACK: "rolled back"}


def _check_conflicts(session: Session, spec: RolloutSpec) -> None:
    """Two active rollouts may not both change one bundle name (or both the config) on a device:
    each would undo the other's waves. Selectors that require different values of one label
    cannot share a device, so "eu" and "us" rollouts of one release may run side by side."""
    mine = spec.bundle.name if spec.bundle is not None else None
    for other in store.active_rollouts(session):
        bundle = session.get(Bundle, other.bundle_id) if other.bundle_id is not None else None
        theirs = bundle.name if bundle is not None else None
        if theirs == mine and store.overlapping(spec.selector, other.selector):
            what = f"model {mine}" if mine else "the device config"
            raise RolloutConflict(
                f"rollout {other.name} ({states.rollout_state_name(other.state)}) also changes {what} "
                "on devices this selector can match: abort it, let it finish, or use selectors that "
                "differ in a label's value"
            )


def create(session: Session, spec: RolloutSpec, *, actor: str) -> Rollout:
    """Records a RUNNING rollout; the engine's next tick starts its first wave."""
    if session.exec(select(Rollout.id).where(Rollout.name == spec.name)).first() is not None:
        raise RolloutExists(f"a rollout named {spec.name} exists; rollouts are kept, choose another name")
    bundle = None
    if spec.bundle is not None:
        bundle = get_bundle(session, name=spec.bundle.name, version=spec.bundle.version)
        assert bundle is not None
    _check_conflicts(session, spec)
    matching = store.matching_device_ids(session, spec.selector)
    if not matching:
        raise RolloutConflict(
            f"no enrolled device matches the selector {selectors.to_text(spec.selector) or '(all)'}"
        )
    now = utcnow()
    rollout = Rollout(
        name=spec.name,
        bundle_id=bundle.id if bundle is not None else None,
        config=spec.config,
        selector=spec.selector,
        waves=[w.as_json() for w in spec.waves],
        soak_seconds=spec.soak_seconds,
        max_concurrent=spec.max_concurrent,
        gates=spec.thresholds.as_json(),
        state=states.RUNNING,
        wave_progress=[{"soak_until": None, "gate_result": ""} for _ in waves.effective(spec.waves)],
        created_by=actor,
        created_at=now,
        updated_at=now,
    )
    session.add(rollout)
    session.flush()
    audit.record(
        session,
        actor=actor,
        action="rollout.create",
        target=spec.name,
        detail={
            "change": f"{bundle.name}@{bundle.version}" if bundle is not None else {"config": spec.config},
            "selector": spec.selector,
            "waves": [str(w) for w in spec.waves] or ["100%"],
            "soak_seconds": spec.soak_seconds,
            "max_concurrent": spec.max_concurrent,
            "gates": spec.thresholds.as_json(),
            "devices_matching": len(matching),
        },
    )
    return rollout


def control(
    session: Session,
    machine: RolloutMachine,
    *,
    ref: operator_pb2.GetRolloutRequest,
    action: int,
    actor: str,
) -> tuple[Rollout, list[str]]:
    """Applies an operator's action; returns the rollout and the devices to nudge (a rollback
    re-assigns devices at once, up to the engine's batch; the engine does the rest)."""
    transition = TRANSITIONS.get(action)  # type: ignore[call-overload]
    if transition is None:
        raise convert.InvalidRollout("action must be pause, resume, abort or rollback")
    rollout = lookup(session, ref, lock=True)
    state = states.rollout_state_name(rollout.state)
    if rollout.state not in transition.allowed:
        hint = {
            "pause": "only a running rollout pauses",
            "resume": "only a paused rollout resumes",
            "abort": "only a running or paused rollout aborts",
            "rollback": "it was rolled back already",
        }[transition.verb]
        raise ImpossibleTransition(f"cannot {transition.verb} rollout {rollout.name}: it is {state}; {hint}")
    now = utcnow()
    rollout.state = transition.to
    rollout.reason = f"{REASONS[transition.to]} by {actor}" if transition.to in REASONS else ""
    rollout.updated_at = now
    session.add(rollout)
    nudge: list[str] = []
    if transition.to == states.ROLLED_BACK:
        step = machine.start(session, rollout, now)
        machine.roll_back(step)
        nudge = step.nudge
    audit.record(
        session,
        actor=actor,
        action=f"rollout.{transition.verb}",
        target=rollout.name,
        detail={"from": state, "devices_rolled_back": nudge} if nudge else {"from": state},
    )
    return rollout, nudge


def lookup(session: Session, ref: operator_pb2.GetRolloutRequest, *, lock: bool = False) -> Rollout:
    which = ref.WhichOneof("rollout")
    if which is None:
        raise convert.InvalidRollout("name the rollout (by name or id)")
    if which == "id":
        return store.get_rollout(session, rollout_id=ref.id, lock=lock)
    return store.get_rollout(session, name=ref.name, lock=lock)


def _bundles(session: Session, ids: Iterable[int | None]) -> dict[int, Bundle]:
    wanted = sorted({i for i in ids if i is not None})
    if not wanted:
        return {}
    return {b.id: b for b in session.exec(select(Bundle).where(col(Bundle.id).in_(wanted))).all() if b.id}


def describe(session: Session, rollout: Rollout) -> operator_pb2.Rollout:
    """The rollout with per-wave and per-device detail."""
    rows = store.rollout_devices(session, rollout.id or 0)
    counts = Counter((r.wave, r.state) for r in rows)
    bundles = _bundles(session, [rollout.bundle_id, *(r.previous_bundle_id for r in rows)])
    return convert.message(rollout, bundles=bundles, counts=counts, devices=rows)


def describe_all(session: Session) -> operator_pb2.ListRolloutsResponse:
    """Every rollout, oldest first, with per-wave counts but no per-device detail."""
    rollouts = store.list_rollouts(session)
    ids = [r.id for r in rollouts if r.id is not None]
    counts = store.device_counts(session, ids)
    bundles = _bundles(session, [r.bundle_id for r in rollouts])
    response = operator_pb2.ListRolloutsResponse()
    for rollout in rollouts:
        mine = counts.get(rollout.id or 0, Counter())
        response.rollouts.append(convert.message(rollout, bundles=bundles, counts=mine))
    return response
