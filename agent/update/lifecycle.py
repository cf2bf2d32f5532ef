"""The update lifecycle as data: which event moves which phase where, and the one place that
persists a move.

Modelled on Mender's client state machine (a table of (state, event) → state, each step saved
before the next, and a loop counter that ends a deployment a crash keeps restarting): the
updater does not set phases, it fires events. ``Lifecycle.fire`` looks the (current phase,
event) pair up in ``RULES``; a pair the table does not hold raises ImpossibleTransition and
nothing is persisted or reported. A move is saved before it becomes current, so a crash at any
point restarts into a phase the table can leave.

The crash-loop breaker is part of the table. Starting a load (LOAD_STARTED, and at boot
BOOT_LOAD_STARTED) persists a "loading generation N of model M" marker before the load runs;
a process that dies inside it leaves the marker, and the next process counts one crash of
that load (AgentState.after_restart). The rules that start a fetch or a load carry the guard
``crash_loop_guard``: a load that killed CRASHES_BEFORE_REFUSAL processes is refused
(RuntimeCrashedWhileLoading, "the runtime crashed while loading ...") until a newer generation,
and the move does not happen. ``edges()`` lists the table for rendering.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from edgefleet.agent.update.errors import AgentError, Refusal
from edgefleet.agent.update.state import (
    AgentState,
    LoadAttempt,
    StateNotSaved,
    save_state,
)
from edgefleet.protos.fleet.v1 import common_pb2

log = logging.getLogger(__name__)

S = common_pb2

PhaseListener = Callable[[AgentState, int, str], None]
"""Called after every persisted transition with (state, generation, detail)."""


class Event(enum.StrEnum):
    """What happened; the table decides the phase it leads to."""

    NUDGED = "nudged"  # a newer generation was announced: verify what the repositories sign
    SETTLED_SERVING = "settled_serving"  # nothing (more) to do, and models serve
    SETTLED_EMPTY = "settled_empty"  # nothing (more) to do, and no model is assigned
    CONFIG_IN_FORCE = "config_in_force"  # the generation's device config is in force
    RELOAD_STARTED = "reload_started"  # installed models load again with new load settings
    FETCH_STARTED = "fetch_started"  # a release's artifact downloads (guarded: crash loop)
    FETCHED = "fetched"  # its bytes matched the signed length and hash
    LOAD_STARTED = "load_started"  # its runtime loads and is smoke-tested (guarded; marker)
    SWAPPED_IN = "swapped_in"  # it loaded and serves; what it replaced is its rollback copy
    REMOVED = "removed"  # a model no longer assigned stopped serving
    REFUSED = "refused"  # the generation, or one of its releases, is refused
    BOOT_LOAD_STARTED = "boot_load_started"  # an installed release loads at boot (guarded; marker)
    BOOT_SERVING = "boot_serving"  # after a restart the installed models serve
    BOOT_ROLLED_BACK = "boot_rolled_back"  # after a restart a release would not load; its previous serves


class ImpossibleTransition(AgentError, RuntimeError):
    """The updater fired an event the current phase has no edge for, or tried to change the
    phase outside the table: a defect, never persisted, in neither error family (retrying the
    same code does the same; refusing would blame the release)."""

    def __init__(self, phase: int, event: Event | None) -> None:
        what = f"event {event.value}" if event is not None else "a phase change outside the table"
        super().__init__(f"{what} is impossible in phase {phase_name(phase)}")
        self.phase = phase
        self.event = event


class RuntimeCrashedWhileLoading(AgentError, Refusal):
    """The agent process died inside this release's load or smoke test in two processes in a
    row (a runtime segfault, the OOM killer): refused on this device until a newer generation."""


Guard = Callable[[AgentState, LoadAttempt | None], None]
"""Raises a Refusal when the move may not happen for this state and load attempt."""


def crash_loop_guard(state: AgentState, attempt: LoadAttempt | None) -> None:
    """The crash-loop breaker: a load that killed CRASHES_BEFORE_REFUSAL processes is refused."""
    assert attempt is not None, "a guarded load event names its load"
    crashed = state.crash_refused(attempt)
    if crashed is not None:
        raise RuntimeCrashedWhileLoading(crash_reason(crashed))


def crash_reason(crashed: LoadAttempt) -> str:
    return (
        f"the runtime crashed while loading {crashed.model_id} (generation {crashed.generation}): "
        f"the agent died inside that load {crashed.crashes} times; refused on this device until a "
        "newer generation"
    )


@dataclass(frozen=True, slots=True)
class Rule:
    """One event's row: the phases it may happen in, the phase it leads to (None: the phase
    stays, the move only records something), its guard, whether it persists a load marker,
    and whether it is reported."""

    event: Event
    sources: frozenset[int]
    target: int | None
    guard: Guard | None = None
    marks_load: bool = False
    reported: bool = True


AT_REST = frozenset(
    {S.DEVICE_STATE_IDLE, S.DEVICE_STATE_ACTIVE, S.DEVICE_STATE_FAILED, S.DEVICE_STATE_ROLLED_BACK}
)
WORKING = frozenset(
    {S.DEVICE_STATE_VERIFYING, S.DEVICE_STATE_FETCHING, S.DEVICE_STATE_INSTALLING, S.DEVICE_STATE_TESTING}
)
ANY = AT_REST | WORKING
"""A nudge and a restart may come in any phase: an update a transient failure or a kill
interrupted is resumed from where it stopped."""

RULES: dict[Event, Rule] = {
    rule.event: rule
    for rule in (
        Rule(Event.NUDGED, ANY, S.DEVICE_STATE_VERIFYING),
        Rule(
            Event.SETTLED_SERVING,
            frozenset({S.DEVICE_STATE_VERIFYING, S.DEVICE_STATE_INSTALLING, S.DEVICE_STATE_TESTING}),
            S.DEVICE_STATE_ACTIVE,
        ),
        Rule(
            Event.SETTLED_EMPTY,
            frozenset({S.DEVICE_STATE_VERIFYING, S.DEVICE_STATE_INSTALLING, S.DEVICE_STATE_TESTING}),
            S.DEVICE_STATE_IDLE,
        ),
        Rule(Event.RELOAD_STARTED, frozenset({S.DEVICE_STATE_VERIFYING}), S.DEVICE_STATE_TESTING),
        Rule(Event.CONFIG_IN_FORCE, frozenset({S.DEVICE_STATE_VERIFYING, S.DEVICE_STATE_TESTING}), None),
        Rule(
            Event.FETCH_STARTED,
            frozenset({S.DEVICE_STATE_VERIFYING, S.DEVICE_STATE_FETCHING, S.DEVICE_STATE_TESTING}),
            S.DEVICE_STATE_FETCHING,
            guard=crash_loop_guard,
        ),
        Rule(Event.FETCHED, frozenset({S.DEVICE_STATE_FETCHING}), S.DEVICE_STATE_INSTALLING),
        Rule(
            Event.LOAD_STARTED,
            frozenset({S.DEVICE_STATE_INSTALLING}),
            S.DEVICE_STATE_TESTING,
            guard=crash_loop_guard,
            marks_load=True,
        ),
        Rule(Event.SWAPPED_IN, frozenset({S.DEVICE_STATE_TESTING}), None),
        Rule(Event.REMOVED, WORKING, S.DEVICE_STATE_INSTALLING),
        Rule(Event.REFUSED, WORKING, S.DEVICE_STATE_FAILED),
        Rule(Event.BOOT_LOAD_STARTED, ANY, None, guard=crash_loop_guard, marks_load=True, reported=False),
        Rule(Event.BOOT_SERVING, ANY, S.DEVICE_STATE_ACTIVE),
        Rule(Event.BOOT_ROLLED_BACK, ANY, S.DEVICE_STATE_ROLLED_BACK),
    )
}
"""The lifecycle. Not listed, so impossible: a fetch before verification, an install that
skips its download, a load that skips its install, activation from a refused or resting
phase, a refusal while at rest."""


def phase_name(phase: int) -> str:
    """ "ACTIVE" for DEVICE_STATE_ACTIVE."""
    try:
        return S.DeviceState.Name(phase).removeprefix("DEVICE_STATE_")
    except ValueError:
        return str(phase)


def next_phase(phase: int, event: Event) -> int:
    """The phase ``event`` leads to from ``phase``; ImpossibleTransition when the table has no edge."""
    rule = RULES[event]
    if phase not in rule.sources:
        raise ImpossibleTransition(phase, event)
    return phase if rule.target is None else rule.target


@dataclass(frozen=True, slots=True)
class Edge:
    """One edge of the lifecycle graph, for docs and tests."""

    source: str
    event: str
    target: str
    guarded: bool


def edges() -> tuple[Edge, ...]:
    """Every (phase, event) → phase edge of the table, by phase name, in a stable order."""
    found = [
        Edge(
            phase_name(source),
            rule.event.value,
            phase_name(next_phase(source, rule.event)),
            rule.guard is not None,
        )
        for rule in RULES.values()
        for source in sorted(rule.sources)
    ]
    return tuple(found)


def edge_pairs() -> frozenset[tuple[int, int]]:
    """The (phase, phase) pairs the table can persist, self-loops included."""
    return frozenset(
        (source, next_phase(source, rule.event)) for rule in RULES.values() for source in rule.sources
    )


class Lifecycle:
    """Holds the current state and is the only code that persists a phase: every move is an
    event checked against ``RULES``, saved, then made current and reported."""

    def __init__(
        self,
        *,
        state: AgentState,
        path: Path,
        on_transition: PhaseListener,
        on_state_not_saved: Callable[[StateNotSaved], None] | None = None,
    ) -> None:
        self.state = state
        self.path = path
        self.on_transition = on_transition
        self.on_state_not_saved = on_state_not_saved
        self.state_writes_failed = 0
        """State writes the disk refused (a full disk): the update waiting on them is retried."""

    def fire(
        self,
        event: Event,
        state: AgentState | None = None,
        *,
        generation: int,
        detail: str = "",
        attempt: LoadAttempt | None = None,
        error: str = "",
        error_kind: str = "",
        best_effort: bool = False,
    ) -> None:
        """Moves to ``state`` (default: the current one) in the phase ``event`` leads to.

        ImpossibleTransition when the table has no (phase, event) edge or ``state`` carries a
        phase of its own; the rule's guard may refuse (RuntimeCrashedWhileLoading); a rule that
        marks a load records ``attempt`` as in progress. Persisted before it becomes current:
        StateNotSaved leaves the current state as it was, unless ``best_effort`` (boot steps,
        whose loss costs a repeat only: logged, and the state in memory moves on)."""
        current = self.state
        base = current if state is None else state
        if base.phase != current.phase:
            raise ImpossibleTransition(current.phase, None)
        target = next_phase(current.phase, event)
        rule = RULES[event]
        if rule.guard is not None:
            rule.guard(current, attempt)
        if rule.marks_load:
            assert attempt is not None, "a load marker names its load"
            base = base.load_started(attempt)
        moved = base if rule.target is None else base.with_phase(target, error=error, error_kind=error_kind)
        if best_effort:
            self.save_best_effort(moved, why=detail or event.value)
        else:
            self.save(moved)
        self.state = moved
        if rule.reported:
            self.on_transition(moved, generation, detail)

    def hold(self, state: AgentState) -> None:
        """``state`` is current, persisted with the next move; it may not change the phase."""
        if state.phase != self.state.phase:
            raise ImpossibleTransition(self.state.phase, None)
        self.state = state

    def save(self, state: AgentState) -> None:
        """Persists ``state`` (StateNotSaved: counted, reported, raised)."""
        try:
            save_state(self.path, state)
        except StateNotSaved as exc:
            self.state_writes_failed += 1
            if self.on_state_not_saved is not None:
                self.on_state_not_saved(exc)
            raise

    def record(self, state: AgentState) -> None:
        """Persists ``state`` without a move (its phase is the current one), then holds it."""
        if state.phase != self.state.phase:
            raise ImpossibleTransition(self.state.phase, None)
        self.save(state)
        self.state = state

    def save_best_effort(self, state: AgentState, *, why: str) -> None:
        """For records whose loss costs nothing but a repeat (boot steps): log, count, go on."""
        try:
            self.save(state)
        except StateNotSaved as exc:
            log.error("%s: %s; serving with the state in memory", why, exc)


def render(rows: Iterable[Edge]) -> str:
    """The edges as text, one per line: ``SOURCE --event--> TARGET`` (guarded edges marked)."""
    return "\n".join(
        f"{e.source} --{e.event}{' [crash-loop guard]' if e.guarded else ''}--> {e.target}" for e in rows
    )
