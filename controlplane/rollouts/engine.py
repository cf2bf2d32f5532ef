"""The rollout state machine: one step of one rollout, inside one transaction.

A step, with the rollout's row locked (so operators' controls and a second engine wait):

1. membership — the unrevoked devices the selector matches now. A device new to the rollout
   gets a wave (controlplane/rollouts/waves.py: the current wave while it has room and is not
   soaking, a later one with room, else the last); a PENDING device that stopped matching
   (revoked, relabelled) leaves. Devices already assigned stay whatever their labels do.
2. progress — an UPDATING device that reports its assigned generation applied (applied
   generation at least that, state ACTIVE, or IDLE when it holds no model) is UPDATED; one that
   reported it FAILED or ROLLED_BACK was marked FAILED as it reported (store.record_device_report,
   which also stamps when it applied).
   A device revoked while UPDATING is FAILED and no longer counts in its wave.
3. waves (RUNNING only; a PAUSED rollout only records progress) — PENDING devices of the current
   wave start, as many as ``max_concurrent`` allows with the UPDATING ones counted (0: all).
   Then the wave's gates (controlplane/rollouts/gates.py): the load gate as soon as its outcome
   is certain; once every device settled, the soak starts (``soak_until``) and when it ends the
   health gates. A gate that fails: the rollout is ROLLED_BACK with the reason, and every
   device it changed goes back. Gates that pass: the wave's UPDATED devices are HEALTHY and the
   next wave starts in the same step; after the last, the rollout is COMPLETED.
4. rollback — a ROLLED_BACK rollout puts back its changed devices (UPDATING, UPDATED, HEALTHY,
   FAILED with a generation), ``rollback_batch`` per step, until none is left.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from sqlalchemy.exc import SQLAlchemyError
from sqlmodel import Session

from edgefleet.controlplane.fleet import audit
from edgefleet.controlplane.fleet.audit import Outcome
from edgefleet.controlplane.rollouts import actions, evidence, gates, states, store, waves
from edgefleet.controlplane.rollouts.actions import Change
from edgefleet.controlplane.store.errors import StoreError
from edgefleet.controlplane.store.models import Bundle, Device, Rollout, RolloutDevice, VariantPinRule
from edgefleet.controlplane.store.pins import list_pins
from edgefleet.controlplane.store.values import as_utc
from edgefleet.controlplane.trust.repositories import Repositories, RepositoryRefusal

log = logging.getLogger(__name__)
ENGINE_ACTOR = "controlplane:rollouts"  # who the audit trail says assigned and rolled back devices


@dataclass(frozen=True, slots=True)
class EngineConfig:
    """How often the engine steps, how far back a device's baseline figures reach, how many
    devices one step rolls back (the rest follow on the next steps), and how many devices of a
    release wave are assigned in one batch."""

    tick_seconds: float = 1.0
    baseline: timedelta = timedelta(hours=1)
    rollback_batch: int = 500
    # Devices of a release wave assigned in one batch (one savepoint, a few bulk statements):
    # bounds each statement's list of ids well under the databases' bound-parameter limits.
    assign_batch: int = 5000


@dataclass
class Step:
    """What one step works on: the locked rollout, its device rows, and the device rows of the
    fleet it looked at, read once."""

    session: Session
    rollout: Rollout
    change: Change
    rows: list[RolloutDevice]
    now: datetime
    devices: dict[str, Device] = field(default_factory=dict)
    nudge: list[str] = field(default_factory=list)
    _pins: list[VariantPinRule] | None = None

    @property
    def pins(self) -> list[VariantPinRule]:
        if self._pins is None:
            self._pins = list(list_pins(self.session))
        return self._pins

    def wave_rows(self, wave: int) -> list[RolloutDevice]:
        return [r for r in self.rows if r.wave == wave]

    def counts(self) -> Counter[int]:
        return Counter(r.state for r in self.rows)

    def revoked(self, row: RolloutDevice) -> bool:
        device = self.devices.get(row.device_id)
        return device is None or device.revoked_at is not None


def wave_sizes(rollout: Rollout) -> list[waves.WaveSize]:
    return waves.effective([waves.WaveSize.from_json(w) for w in rollout.waves])


def progress_of(rollout: Rollout, wave: int) -> dict[str, object]:
    """The wave's stored soak and gate result (a copy: JSON columns are replaced, not edited)."""
    stored = rollout.wave_progress[wave] if wave < len(rollout.wave_progress) else {}
    return {"soak_until": stored.get("soak_until"), "gate_result": stored.get("gate_result", "")}


def _set_progress(rollout: Rollout, wave: int, **values: object) -> None:
    count = len(wave_sizes(rollout))
    progress = [progress_of(rollout, i) for i in range(count)]
    progress[wave].update(values)
    rollout.wave_progress = progress


def _audit(step: Step, action: str, detail: dict[str, object], outcome: str = Outcome.OK) -> None:
    """The engine's own changes land in the audit trail like an operator's, under its own actor."""
    audit.record(
        step.session,
        actor=ENGINE_ACTOR,
        action=action,
        target=step.rollout.name,
        outcome=outcome,
        detail=detail,
    )


def soak_until(rollout: Rollout, wave: int) -> datetime | None:
    value = progress_of(rollout, wave)["soak_until"]
    return as_utc(datetime.fromisoformat(value)) if isinstance(value, str) else None


class RolloutMachine:
    """Applies the rules above; owns no state (everything is in the database)."""

    def __init__(self, repositories: Repositories, config: EngineConfig) -> None:
        self.repositories = repositories
        self.config = config

    def step(self, session: Session, *, rollout_id: int, now: datetime) -> list[str]:
        """Advances one rollout as far as it can go now; returns the devices to nudge."""
        rollout = store.get_rollout(session, rollout_id=rollout_id, lock=True)
        step = self.start(session, rollout, now)
        if rollout.state == states.ROLLED_BACK:
            self.roll_back(step)
        elif rollout.state in states.ACTIVE:
            before = (rollout.state, rollout.current_wave, list(rollout.wave_progress))
            self._join(step)
            self._progress(step)
            if rollout.state == states.RUNNING:
                self._advance(step)
            if (rollout.state, rollout.current_wave, rollout.wave_progress) != before:
                rollout.updated_at = now
                session.add(rollout)
        return step.nudge

    def start(self, session: Session, rollout: Rollout, now: datetime) -> Step:
        """A step over ``rollout`` (locked by the caller), for operators' controls."""
        return Step(
            session,
            rollout,
            Change.of(session, rollout),
            store.rollout_devices(session, rollout.id or 0),
            now,
        )

    # -- 1. membership ---------------------------------------------------------------------

    def _join(self, step: Step) -> None:
        rollout, session = step.rollout, step.session
        members = store.matching_device_ids(session, rollout.selector)
        matching = set(members)
        for row in [r for r in step.rows if r.state == states.PENDING and r.device_id not in matching]:
            session.delete(row)
            step.rows.remove(row)
        known = {r.device_id for r in step.rows}
        new = [d for d in members if d not in known]
        if new:
            sizes = wave_sizes(rollout)
            counts = [len(step.wave_rows(w)) for w in range(len(sizes))]
            current = rollout.current_wave
            # A soaking wave is closed to newcomers, unless it is the last: they wait for the next.
            soaking = soak_until(rollout, current) is not None and current < len(sizes) - 1
            first_open = current + 1 if soaking else current
            placed = waves.place(
                counts, waves.cumulative_sizes(sizes, len(step.rows) + len(new)), first_open, len(new)
            )
            for device_id, wave in zip(new, placed, strict=True):
                row = RolloutDevice(
                    rollout_id=rollout.id or 0,
                    device_id=device_id,
                    wave=wave,
                    state=states.PENDING,
                    updated_at=step.now,
                )
                session.add(row)
                step.rows.append(row)
        step.devices = store.devices(
            session,
            [r.device_id for r in step.rows if r.wave >= rollout.current_wave or r.state == states.UPDATING],
        )

    # -- 2. progress -----------------------------------------------------------------------

    def _progress(self, step: Step) -> None:
        for row in step.rows:
            if row.state != states.UPDATING:
                continue
            device = step.devices.get(row.device_id)
            if device is None or device.revoked_at is not None:
                row.state, row.reason = states.FAILED, "revoked during the rollout"
            elif device.applied_generation >= row.generation and device.state in states.DEVICE_APPLIED:
                row.state, row.applied_at = states.UPDATED, row.applied_at or step.now
            else:
                continue
            row.updated_at = step.now
            step.session.add(row)

    # -- 3. waves --------------------------------------------------------------------------

    def _advance(self, step: Step) -> None:
        rollout = step.rollout
        last = len(wave_sizes(rollout)) - 1
        while rollout.state == states.RUNNING:
            wave = rollout.current_wave
            self._start_devices(step, wave)
            verdict = self._judge(step, wave)
            if verdict is None:
                return
            if not verdict.passed:
                _set_progress(rollout, wave, gate_result=f"failed: {verdict.text}")
                rollout.state = states.ROLLED_BACK
                rollout.reason = f"wave {wave + 1} of {last + 1} failed its gates: {verdict.text}"[:2000]
                log.warning("rollout %s: %s; rolling back", rollout.name, rollout.reason)
                _audit(step, "rollout.gate_failed", {"wave": wave, "result": verdict.text}, Outcome.FAILED)
                self.roll_back(step)
                return
            _set_progress(rollout, wave, gate_result=f"passed: {verdict.text}")
            _audit(step, "rollout.wave_passed", {"wave": wave, "result": verdict.text})
            for row in step.wave_rows(wave):
                if row.state == states.UPDATED:
                    row.state, row.updated_at = states.HEALTHY, step.now
                    step.session.add(row)
            if wave >= last:
                rollout.state, rollout.reason = states.COMPLETED, "every wave passed its gates"
                log.info("rollout %s completed", rollout.name)
                _audit(step, "rollout.completed", {})
            else:
                rollout.current_wave = wave + 1
                log.info("rollout %s: wave %d passed, wave %d starts", rollout.name, wave + 1, wave + 2)

    def _start_devices(self, step: Step, wave: int) -> None:
        pending = [r for r in step.wave_rows(wave) if r.state == states.PENDING and r.generation == 0]
        limit = step.rollout.max_concurrent
        room = len(pending) if limit <= 0 else max(0, limit - step.counts()[states.UPDATING])
        starting = pending[:room]
        assigned: dict[str, int] = {}
        for first in range(0, len(starting), self.config.assign_batch):
            batch = starting[first : first + self.config.assign_batch]
            if self._start_release(step, batch):
                assigned.update((row.device_id, row.generation) for row in batch)
                step.nudge.extend(row.device_id for row in batch)
            else:
                assigned.update(self._start_one_by_one(step, batch))
        if assigned:
            _audit(step, "rollout.assign", {"wave": wave, "devices": assigned})

    def _start_release(self, step: Step, rows: list[RolloutDevice]) -> bool:
        """Assigns a release rollout's change to all of ``rows`` in one batch (one savepoint);
        False, with nothing changed, when the rollout is a config rollout or any device of the
        batch cannot be assigned: then each one is tried on its own."""
        if step.change.bundle is None or not rows:
            return False
        try:
            with step.session.begin_nested():
                actions.assign_release(
                    step.session,
                    self.repositories,
                    bundle=step.change.bundle,
                    rows=rows,
                    pins=step.pins,
                    now=step.now,
                )
        except (RepositoryRefusal, StoreError, SQLAlchemyError) as exc:
            log.info("rollout %s: batch not assigned (%s); assigning one by one", step.rollout.name, exc)
            return False
        return True

    def _start_one_by_one(self, step: Step, rows: list[RolloutDevice]) -> dict[str, int]:
        """Each row's device in a savepoint of its own, so one that cannot be assigned is FAILED
        and the others go on; returns the generations of those assigned."""
        assigned: dict[str, int] = {}
        for row in rows:
            try:
                with step.session.begin_nested():
                    actions.assign(
                        step.session,
                        self.repositories,
                        change=step.change,
                        row=row,
                        pins=step.pins,
                        now=step.now,
                    )
            except (RepositoryRefusal, StoreError, SQLAlchemyError) as exc:
                # The savepoint undid this device's assignment; the rollout goes on without it.
                log.warning("rollout %s: cannot assign %s: %s", step.rollout.name, row.device_id, exc)
                row.state, row.reason, row.updated_at = states.FAILED, f"not assigned: {exc}"[:500], step.now
                step.session.add(row)
                continue
            assigned[row.device_id] = row.generation
            step.nudge.append(row.device_id)
        return assigned

    def _judge(self, step: Step, wave: int) -> gates.Verdict | None:
        """The wave's verdict, or None while it is still open."""
        rollout = step.rollout
        members = [r for r in step.wave_rows(wave) if not step.revoked(r)]
        thresholds = gates.Thresholds.from_json(rollout.gates)
        load = gates.load_gate(
            failed=sum(r.state == states.FAILED for r in members),
            settled=sum(r.state in states.SETTLED for r in members),
            total=len(members),
            thresholds=thresholds,
        )
        if load is None or not load.passed or not members:
            return load
        until = soak_until(rollout, wave)
        if until is None:
            until = step.now + timedelta(seconds=rollout.soak_seconds)
            _set_progress(rollout, wave, soak_until=until.isoformat())
        if step.now < until:
            return None
        health = gates.health_gates(self._evidence(step, members), thresholds)
        return gates.Verdict(health.passed, f"{load.text}; {health.text}")

    def _evidence(self, step: Step, members: list[RolloutDevice]) -> list[gates.Evidence]:
        applied = [r for r in members if r.state in (states.UPDATED, states.HEALTHY) and r.assigned_at]
        if not applied:
            return []
        since = min(as_utc(r.assigned_at) for r in applied if r.assigned_at) - self.config.baseline
        summaries = [
            evidence.summary(t)
            for t in store.inference_rows(step.session, [r.device_id for r in applied], since)
        ]
        bundle = step.change.bundle
        if bundle is None:
            return evidence.for_config(applied, summaries, baseline=self.config.baseline)
        previous: dict[int, evidence.ReleaseKey] = {}
        for bundle_id in {r.previous_bundle_id for r in applied if r.previous_bundle_id is not None}:
            found = step.session.get(Bundle, bundle_id)
            if found is not None and found.id is not None:
                previous[found.id] = (found.name, found.version)
        return evidence.for_release(
            applied,
            summaries,
            release=(bundle.name, bundle.version),
            previous=previous,
            baseline=self.config.baseline,
        )

    # -- 4. rollback -----------------------------------------------------------------------

    def roll_back(self, step: Step) -> None:
        """Puts back up to ``rollback_batch`` of the rollout's changed devices."""
        todo = [r for r in step.rows if r.state in states.CHANGED and r.generation > 0]
        moved: dict[str, int] = {}
        for row in todo[: self.config.rollback_batch]:
            try:
                with step.session.begin_nested():
                    reassigned = actions.roll_back(
                        step.session,
                        self.repositories,
                        change=step.change,
                        row=row,
                        pins=step.pins,
                        now=step.now,
                    )
            except (RepositoryRefusal, StoreError, SQLAlchemyError) as exc:
                # Undone by the savepoint; the row stays as it was, so the next step tries again.
                log.warning("rollout %s: cannot roll %s back yet: %s", step.rollout.name, row.device_id, exc)
                continue
            if reassigned:
                moved[row.device_id] = row.rollback_generation
                step.nudge.append(row.device_id)
        if moved:
            _audit(step, "rollout.devices_rolled_back", {"devices": moved})
