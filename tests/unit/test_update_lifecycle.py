"""The update lifecycle is a transition table: only its edges are ever persisted, an impossible
move raises a typed error and leaves the state file as it was, and the crash-loop breaker (a
load that killed two agent processes is refused) is a guard of the table's load rules.

A hypothesis state machine fires arbitrary events, process deaths and load outcomes at the
lifecycle and at the real updater (fake runtimes), and checks every state written."""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from edgefleet.agent.config import AgentConfig
from edgefleet.agent.runtimes.base import RuntimeLoadError
from edgefleet.agent.update import lifecycle as lifecycle_module
from edgefleet.agent.update.lifecycle import (
    ANY,
    RULES,
    Event,
    ImpossibleTransition,
    Lifecycle,
    RuntimeCrashedWhileLoading,
    edge_pairs,
    edges,
    next_phase,
    render,
)
from edgefleet.agent.update.state import AgentState, LoadAttempt, load_state, save_state
from edgefleet.protos.fleet.v1 import common_pb2
from tests.unit.test_device_config_agent import (
    CLI_N_CTX,
    TINY,
    ArtifactServer,
    Device,
    gguf_release,
    make_device,
    payloads,
)

S = common_pb2
TINY2 = gguf_release("tiny", 2)
OTHER = gguf_release("other", 1)
ATTEMPTS = (
    LoadAttempt(bundle="m", version=2, artifact_sha256="ab", generation=7),
    LoadAttempt(bundle="m", version=2, artifact_sha256="ab", generation=8),
)


def machine(path: Path, state: AgentState | None = None) -> tuple[Lifecycle, list[tuple[int, int, str]]]:
    reports: list[tuple[int, int, str]] = []
    start = state if state is not None else load_state(path)
    return (
        Lifecycle(
            state=start,
            path=path,
            on_transition=lambda s, generation, detail: reports.append((s.phase, generation, detail)),
        ),
        reports,
    )


# -- the table ---------------------------------------------------------------------------------


def test_the_table_holds_the_update_path_and_not_its_shortcuts() -> None:
    path = [
        (S.DEVICE_STATE_IDLE, Event.NUDGED, S.DEVICE_STATE_VERIFYING),
        (S.DEVICE_STATE_VERIFYING, Event.FETCH_STARTED, S.DEVICE_STATE_FETCHING),
        (S.DEVICE_STATE_FETCHING, Event.FETCHED, S.DEVICE_STATE_INSTALLING),
        (S.DEVICE_STATE_INSTALLING, Event.LOAD_STARTED, S.DEVICE_STATE_TESTING),
        (S.DEVICE_STATE_TESTING, Event.SWAPPED_IN, S.DEVICE_STATE_TESTING),
        (S.DEVICE_STATE_TESTING, Event.SETTLED_SERVING, S.DEVICE_STATE_ACTIVE),
        (S.DEVICE_STATE_TESTING, Event.REFUSED, S.DEVICE_STATE_FAILED),
        (S.DEVICE_STATE_FAILED, Event.BOOT_ROLLED_BACK, S.DEVICE_STATE_ROLLED_BACK),
    ]
    for source, event, target in path:
        assert next_phase(source, event) == target
    for source, event in [
        (S.DEVICE_STATE_IDLE, Event.FETCH_STARTED),  # a fetch before verification
        (S.DEVICE_STATE_VERIFYING, Event.FETCHED),  # an install that skips its download
        (S.DEVICE_STATE_FETCHING, Event.LOAD_STARTED),  # a load that skips its install
        (S.DEVICE_STATE_FAILED, Event.SETTLED_SERVING),  # activation from a refusal
        (S.DEVICE_STATE_ACTIVE, Event.REFUSED),  # a refusal while at rest
    ]:
        with pytest.raises(ImpossibleTransition):
            next_phase(source, event)


def test_edges_list_every_rule_for_rendering() -> None:
    listed = edges()
    assert len(listed) == sum(len(r.sources) for r in RULES.values())
    assert {(e.source, e.event, e.target) for e in listed} >= {
        ("IDLE", "nudged", "VERIFYING"),
        ("VERIFYING", "fetch_started", "FETCHING"),
        ("INSTALLING", "load_started", "TESTING"),
        ("TESTING", "settled_serving", "ACTIVE"),
    }
    assert {e.event for e in listed if e.guarded} == {"fetch_started", "load_started", "boot_load_started"}
    assert "INSTALLING --load_started [crash-loop guard]--> TESTING" in render(listed).splitlines()


def test_an_impossible_event_is_neither_persisted_nor_reported(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    save_state(path, AgentState(phase=S.DEVICE_STATE_ACTIVE, applied_generation=3))
    before = path.read_bytes()
    life, reports = machine(path)
    with pytest.raises(ImpossibleTransition) as caught:
        life.fire(Event.FETCHED, generation=4)
    assert (caught.value.phase, caught.value.event) == (S.DEVICE_STATE_ACTIVE, Event.FETCHED)
    assert path.read_bytes() == before and reports == [] and life.state.phase == S.DEVICE_STATE_ACTIVE


def test_a_phase_set_outside_the_table_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    life, _ = machine(path, AgentState())
    with pytest.raises(ImpossibleTransition):
        life.fire(Event.NUDGED, life.state.with_phase(S.DEVICE_STATE_ACTIVE), generation=1)
    with pytest.raises(ImpossibleTransition):
        life.hold(life.state.with_phase(S.DEVICE_STATE_TESTING))
    with pytest.raises(ImpossibleTransition):
        life.record(life.state.with_phase(S.DEVICE_STATE_FAILED))
    assert not path.exists() and life.state == AgentState()


# -- the crash-loop breaker, through the table -------------------------------------------------------


def to_installing(life: Lifecycle, attempt: LoadAttempt) -> None:
    life.fire(Event.NUDGED, generation=attempt.generation)
    life.fire(Event.FETCH_STARTED, generation=attempt.generation, attempt=attempt)
    life.fire(Event.FETCHED, generation=attempt.generation)


def died(path: Path) -> Lifecycle:
    """The process died: the next one reads the file and counts the load it died in."""
    save_state(path, load_state(path).after_restart())
    return machine(path)[0]


def test_the_second_death_in_the_same_load_refuses_it_through_the_guard(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    attempt = ATTEMPTS[0]
    life, _ = machine(path, AgentState())
    for crashes in range(2):
        to_installing(life, attempt)
        life.fire(Event.LOAD_STARTED, generation=7, attempt=attempt)
        marker = load_state(path).loading
        assert marker == replace(attempt, crashes=crashes)  # persisted before the load runs
        life = died(path)

    before = path.read_bytes()
    life.fire(Event.NUDGED, generation=7)
    with pytest.raises(RuntimeCrashedWhileLoading, match="the runtime crashed while loading m@2"):
        life.fire(Event.FETCH_STARTED, generation=7, attempt=attempt)
    assert load_state(path).phase == S.DEVICE_STATE_VERIFYING  # the move did not happen
    with pytest.raises(RuntimeCrashedWhileLoading):
        life.fire(Event.BOOT_LOAD_STARTED, generation=7, attempt=attempt, best_effort=True)
    assert load_state(path).loading is None
    life.fire(Event.REFUSED, generation=7, error="crashed", error_kind="RuntimeCrashedWhileLoading")
    assert load_state(path).phase == S.DEVICE_STATE_FAILED
    assert path.read_bytes() != before

    newer = ATTEMPTS[1]  # a newer generation is a new chance
    to_installing(life, newer)
    life.fire(Event.LOAD_STARTED, generation=8, attempt=newer)
    assert load_state(path).loading == newer


def test_one_death_then_a_load_that_works_forgets_the_death(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    attempt = ATTEMPTS[0]
    life, _ = machine(path, AgentState())
    to_installing(life, attempt)
    life.fire(Event.LOAD_STARTED, generation=7, attempt=attempt)
    life = died(path)
    assert life.state.crashed == (replace(attempt, crashes=1),)
    to_installing(life, attempt)
    life.fire(Event.LOAD_STARTED, generation=7, attempt=attempt)
    life.hold(life.state.load_ended(loaded=True))
    life.fire(Event.SWAPPED_IN, generation=7)
    state = load_state(path)
    assert (state.loading, state.crashed) == (None, ())


def test_a_boot_load_marker_is_persisted_but_not_reported(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    life, reports = machine(path, AgentState(phase=S.DEVICE_STATE_FAILED, last_error="bad"))
    life.fire(Event.BOOT_LOAD_STARTED, generation=3, attempt=ATTEMPTS[0], best_effort=True)
    state = load_state(path)
    assert (state.phase, state.last_error, state.loading, reports) == (
        S.DEVICE_STATE_FAILED,
        "bad",
        ATTEMPTS[0],
        [],
    )


# -- only table edges are persisted: the lifecycle alone ----------------------------------------------


class LifecycleMachine(RuleBasedStateMachine):
    """Arbitrary events, deaths and load outcomes at a Lifecycle over a real state file."""

    def __init__(self) -> None:
        super().__init__()
        self.dir = Path(tempfile.mkdtemp())
        self.path = self.dir / "state.json"
        self.life, _ = machine(self.path, AgentState())
        self.persisted: list[AgentState] = [AgentState()]

    def teardown(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)

    def _written(self) -> None:
        if self.path.exists():
            state = load_state(self.path)
            if state != self.persisted[-1]:
                self.persisted.append(state)

    @rule(event=st.sampled_from(list(Event)), attempt=st.sampled_from(ATTEMPTS))
    def fire(self, event: Event, attempt: LoadAttempt) -> None:
        phase = self.life.state.phase
        before = self.path.read_bytes() if self.path.exists() else None
        impossible = phase not in RULES[event].sources
        refused = RULES[event].guard is not None and self.life.state.crash_refused(attempt) is not None
        expected: type[Exception] | None = (
            ImpossibleTransition if impossible else RuntimeCrashedWhileLoading if refused else None
        )
        if expected is not None:
            with pytest.raises(expected):
                self.life.fire(event, generation=attempt.generation, attempt=attempt)
            assert (self.path.read_bytes() if self.path.exists() else None) == before
            assert self.life.state.phase == phase
            return
        self.life.fire(event, generation=attempt.generation, attempt=attempt, error="e", error_kind="E")
        assert self.life.state.phase == next_phase(phase, event)
        self._written()

    @rule(loaded=st.booleans())
    def load_ended(self, loaded: bool) -> None:
        self.life.hold(self.life.state.load_ended(loaded=loaded))

    @rule()
    def process_died(self) -> None:
        if self.path.exists():
            self.life = died(self.path)
            self._written()

    @invariant()
    def only_table_edges_were_persisted(self) -> None:
        pairs = edge_pairs()
        for before, after in zip(self.persisted, self.persisted[1:], strict=False):
            assert before.phase == after.phase or (before.phase, after.phase) in pairs

    @invariant()
    def a_refused_load_is_never_started(self) -> None:
        loading = self.persisted[-1].loading
        assert loading is None or loading.crashes < 2


TestLifecycleMachine = LifecycleMachine.TestCase
TestLifecycleMachine.settings = settings(max_examples=60, stateful_step_count=30, deadline=None)


# -- only table edges are persisted: the real updater -------------------------------------------------


class Died(BaseException):
    """The runtime killed the process (no refusal catches it)."""


class UpdaterMachine(RuleBasedStateMachine):
    """Deployments, refusals, deaths inside loads and restarts at the real Updater (fake
    runtimes): every state file it writes moves along a table edge, and a load that killed two
    processes is never loaded again."""

    def __init__(self) -> None:
        super().__init__()
        self.dir = Path(tempfile.mkdtemp())
        config = AgentConfig(
            controlplane="127.0.0.1:1",
            state_dir=self.dir,
            trust_path=self.dir / "trust.json",
            n_ctx=CLI_N_CTX,
            keep_alive_seconds=None,
        )
        self.device: Device = make_device(config, ArtifactServer(payloads(TINY, TINY2, OTHER)))
        self.generation = 0
        self.persisted: list[int] = []
        self.crash_next = False
        self.refuse_next = False
        real = save_state

        def recording(path: Path, state: AgentState) -> None:
            real(path, state)
            if not self.persisted or self.persisted[-1] != state.phase:
                self.persisted.append(state.phase)

        self.patch = mock.patch.object(lifecycle_module, "save_state", recording)
        self.patch.start()
        self.wrap_loader()

    def teardown(self) -> None:
        self.patch.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def wrap_loader(self) -> None:
        inner = self.device.loader

        def loader(**kwargs: Any) -> Any:
            if self.crash_next:
                self.crash_next = False
                raise Died()
            if self.refuse_next:
                self.refuse_next = False
                raise RuntimeLoadError("the runtime refuses this model")
            return inner(**kwargs)

        self.device.updater.loader = loader

    @rule(
        releases=st.sampled_from([(TINY,), (TINY2,), (TINY, OTHER), (OTHER,), ()]),
        load=st.sampled_from(["works", "crashes", "is refused"]),
    )
    def deploy(self, releases: tuple[Any, ...], load: str) -> None:
        self.generation += 1
        self.crash_next, self.refuse_next = load == "crashes", load == "is refused"
        try:
            asyncio.run(self.device.deploy(self.generation, *releases))
        except Died:
            self.restart()
        self.crash_next = self.refuse_next = False

    @rule()
    def refused_config(self) -> None:
        self.generation += 1
        bad = common_pb2.DeviceConfig(n_ctx=1)  # below every limit: refused
        asyncio.run(self.device.deploy(self.generation, TINY, config=bad))
        assert self.device.state.phase == S.DEVICE_STATE_FAILED

    @rule()
    def restart_while_idle(self) -> None:
        self.restart()

    def restart(self) -> None:
        path = self.device.config.state_path
        if path.exists():
            save_state(path, load_state(path).after_restart())
        self.device = self.device.restarted()
        self.wrap_loader()
        asyncio.run(self.device.updater.restore())
        crashed = [c for c in self.device.state.crashed if c.crashes >= 2]
        for record in self.device.state.models:
            assert all(not c.same_load(_attempt(record)) for c in crashed), "a crash-refused load serves"

    @invariant()
    def only_table_edges_were_persisted(self) -> None:
        pairs = edge_pairs()
        for before, after in zip(self.persisted, self.persisted[1:], strict=False):
            assert (before, after) in pairs, f"{before} -> {after} is no edge of the table"
            assert after in ANY


def _attempt(record: Any) -> LoadAttempt:
    return LoadAttempt(record.bundle, record.version, record.artifact_sha256, record.generation)


TestUpdaterMachine = UpdaterMachine.TestCase
TestUpdaterMachine.settings = settings(
    max_examples=25,
    stateful_step_count=12,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
