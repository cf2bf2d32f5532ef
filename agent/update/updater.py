"""The updater: applies desired states one at a time (verify → fetch → install → test →
activate, or refuse and keep serving) and restores the installed models at boot.

The phases and which event leads where are data (``lifecycle``: the transition table and the
crash-loop breaker); what a generation will do is decided first (``planning``); the steps that
change what serves are ``steps``. This module orders them. Modelled on Mender's client: every
transition is persisted before the next step, so a crash at any point restarts into a known
phase; a model is replaced only after its successor loaded and answered a smoke test, so each
model serves its old or its new release, never neither.

A device holds several models (one release per bundle name): a generation installs each
assigned release that changed, removes the models no longer assigned, and leaves the rest
serving untouched.

A generation may also carry a device config, signed with the rest (never taken from the
nudge). The settings in force are the command line's, overridden by each field the config
sets. The config is checked again here (a compromised director holds the online key, not the
operator's judgement) and put in force as a unit, before the releases of its generation install:

* ``max_running``/``max_waiting`` and ``telemetry_interval_seconds`` apply live (the
  ``on_settings`` listener: the admission queue and the flush schedule);
* ``keep_alive_seconds`` applies to every loaded model's keep-alive at once and to new loads;
* ``n_ctx``/``n_threads`` load each installed model again: every new runtime is loaded and
  smoke-tested first, then all are swapped in; one failure unloads the new ones and refuses the
  generation with the old runtimes and the old settings still in force;
* its ``pin`` is the operator's pin when the director signed none; a director pin wins.

An unusable config is refused like a bad release: FAILED with the reason, nothing changes. The
generation counts as applied only once its config is in force (and every release installed);
the config in force is persisted with the state and applies at boot before any model loads.

Errors come in two families (``errors``): a Refusal ends the generation FAILED with the
reason and is not tried again; a TransientFailure (the control plane away, a state file or
artifact the disk cannot write for now) leaves the phase where it is and propagates, for the
caller to retry.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import replace

from edgefleet.agent.config import AgentConfig, EffectiveSettings, effective_settings
from edgefleet.agent.device.hardware import HardwareProfile, detect_hardware, load_profile_override
from edgefleet.agent.runtimes.base import Runtime
from edgefleet.agent.runtimes.keep_alive import KeepAliveRuntime
from edgefleet.agent.runtimes.memory_budget import MemoryBudget
from edgefleet.agent.runtimes.model_table import ModelTable
from edgefleet.agent.runtimes.registry import load_runtime, supported_formats
from edgefleet.agent.update import adapters
from edgefleet.agent.update.artifacts import ArtifactStore
from edgefleet.agent.update.errors import ControlPlaneUnavailable, TransientFailure, typed_os_errors
from edgefleet.agent.update.lifecycle import (
    Event,
    Lifecycle,
    PhaseListener,
    RuntimeCrashedWhileLoading,
)
from edgefleet.agent.update.planning import (
    REFUSALS,
    Serving,
    UnusableConfig,
    pin_overridden,
    plan,
    release_pins,
    signed_config,
    signed_pin,
)
from edgefleet.agent.update.selection import Selection
from edgefleet.agent.update.state import AgentState, InstallRecord, StateNotSaved
from edgefleet.agent.update.steps import FOLDER_FORMATS, RuntimeLoader, Steps, attempt_of
from edgefleet.agent.update.uptane_client import Assignment, UptaneVerifier
from edgefleet.protos.fleet import release as rel
from edgefleet.protos.fleet.device_config import InvalidConfig, describe_config, validate_config
from edgefleet.protos.fleet.v1 import common_pb2, device_pb2, device_pb2_grpc

__all__ = [
    "FOLDER_FORMATS",
    "REFUSALS",
    "PhaseListener",
    "RuntimeCrashedWhileLoading",
    "RuntimeLoader",
    "SettingsListener",
    "UnusableConfig",
    "Updater",
    "release_pins",
    "signed_config",
    "signed_pin",
]

log = logging.getLogger(__name__)

S = common_pb2
SettingsListener = Callable[[EffectiveSettings], None]
"""Called with the settings in force at boot and whenever a device config changes them."""


class Updater:
    """Applies desired states one at a time and restores the installed models at boot."""

    def __init__(
        self,
        *,
        config: AgentConfig,
        store: ArtifactStore,
        models: ModelTable,
        state: AgentState,
        on_transition: PhaseListener,
        available_ram: Callable[[], int | None],
        hardware: HardwareProfile | None = None,
        budget: MemoryBudget | None = None,
        on_settings: SettingsListener | None = None,
        loader: RuntimeLoader = load_runtime,
        on_state_not_saved: Callable[[StateNotSaved], None] | None = None,
    ) -> None:
        """``hardware`` replaces detection (tests); otherwise ``restore`` detects it once, or reads
        ``config.hardware_profile_path``. ``available_ram`` refreshes the detected free RAM at
        each selection, since what is free at boot is not what is free at the next release.
        ``budget`` bounds what the models hold in memory at once (None: unlimited).
        ``on_settings`` applies the live settings the updater does not own (admission limits,
        telemetry interval). ``loader`` loads a model file (default: the runtime registry)."""
        self.config = config
        self.store = store
        self.models = models
        self.available_ram = available_ram
        self.budget = budget or MemoryBudget(None)
        self._hardware = hardware
        self._hardware_is_override = hardware is not None or config.hardware_profile_path is not None
        self.selection: Selection | None = None
        """The latest variant choice, for status reports; None until a release was selected."""
        self.on_settings = on_settings
        self.settings = effective_settings(config, None)
        """The settings in force; ``restore`` lays the persisted device config over them."""
        self.lifecycle = Lifecycle(
            state=state,
            path=config.state_path,
            on_transition=on_transition,
            on_state_not_saved=on_state_not_saved,
        )
        self.steps = Steps(
            lifecycle=self.lifecycle,
            store=store,
            models=models,
            budget=self.budget,
            loader=loader,
            artifact_budget_bytes=config.artifact_budget_bytes,
        )

    @property
    def state(self) -> AgentState:
        """The current state (persisted, except what a step holds until its next move)."""
        return self.lifecycle.state

    @state.setter
    def state(self, state: AgentState) -> None:
        """For a caller that replaces the whole state (a rebuild); never a move of the lifecycle."""
        self.lifecycle.state = state

    @property
    def loader(self) -> RuntimeLoader:
        return self.steps.loader

    @loader.setter
    def loader(self, loader: RuntimeLoader) -> None:
        self.steps.loader = loader

    @property
    def state_writes_failed(self) -> int:
        """State writes the disk refused (a full disk): the update waiting on them is retried."""
        return self.lifecycle.state_writes_failed

    # -- boot --------------------------------------------------------------------------

    async def hardware(self) -> HardwareProfile:
        """The device's hardware profile, detected (or read from the override file) once."""
        if self._hardware is None:
            path = self.config.hardware_profile_path
            if path is not None:
                self._hardware = await asyncio.to_thread(load_profile_override, path)
            else:
                self._hardware = await asyncio.to_thread(detect_hardware, disk_path=self.config.state_dir)
            log.info("hardware profile: %s", self._hardware.to_dict())
        return self._hardware

    async def _selection_profile(self) -> HardwareProfile:
        profile = await self.hardware()
        if not self._hardware_is_override:  # the operator's figures win over live measurement
            live = self.available_ram()
            profile = profile if live is None else replace(profile, ram_available_bytes=live)
        limit = self.budget.limit_bytes
        if limit is not None:
            # A variant larger than the whole models' budget could never load here.
            ram = profile.ram_available_bytes
            profile = replace(profile, ram_available_bytes=limit if ram is None else min(ram, limit))
        return profile

    async def restore(self, *, collect_garbage: bool = True) -> None:
        """Puts the persisted device config in force, then loads the installed models with it,
        offline: the control plane need not be up. ``collect_garbage=False`` keeps every
        artifact (a state rebuilt from the disk may not name all that a later apply can use)."""
        await self.hardware()
        self._settings_at_boot()
        await self._load_at_boot()
        if collect_garbage:
            # A crash between activation and garbage collection leaves an unused artifact behind.
            self.steps.collect_garbage(keep_partial=True)

    def _settings_at_boot(self) -> None:
        """The persisted config was checked when it was signed in; it is checked again because
        this build may be older or stricter. One it cannot use is dropped (logged): serving with
        the command line's settings beats not serving at all."""
        config = self.state.config_in_force()
        try:
            if config is not None:
                validate_config(config)
        except InvalidConfig as exc:
            log.error("persisted device config unusable (%s); using the command line's settings", exc)
            self.lifecycle.hold(self.state.with_config(None))
            self.lifecycle.save_best_effort(self.state, why="dropping the unusable device config")
            config = None
        self._apply_settings(effective_settings(self.config, config))
        if config is not None:
            log.info("device config in force: %s", describe_config(config))

    def _apply_settings(self, settings: EffectiveSettings) -> None:
        """The live part: keep-alive of every loaded model now, then the listener's settings.
        Load settings apply to the loads that follow."""
        self.settings = settings
        for runtime in self.models.runtimes():
            if isinstance(runtime, KeepAliveRuntime):
                runtime.keep_alive_s = settings.keep_alive_seconds
        if self.on_settings is not None:
            self.on_settings(settings)

    async def _load_at_boot(self) -> None:
        served: list[str] = []
        rolled_back: list[str] = []
        for record in self.state.models:
            if record.adapter_of:
                continue  # loaded over its base once the bases serve
            runtime = await self._try_load_installed(record)
            if runtime is None and (rollback := self.state.previous_of(record.bundle)) is not None:
                runtime = await self._try_load_installed(rollback)
                if runtime is not None:
                    self.lifecycle.hold(self.state.rolled_back(record.bundle))
                    rolled_back.append(rollback.model_id)
            if runtime is not None:
                self.models.put(runtime)
                self.steps.loaded_with[record.bundle] = self.settings.load
                served.append(record.bundle)
        await adapters.reattach(self.steps, self.state, served)
        if not served:
            self.lifecycle.save_best_effort(self.state, why="boot loads ended")
            return
        # What was applied, not the newest model's generation: a kill after a model was swapped
        # in but before its generation was applied must not report that generation as applied
        # (the nudge applies it again, finding the model already installed).
        generation = self.state.applied_generation
        if rolled_back:
            event = Event.BOOT_ROLLED_BACK
            detail = f"installed release unloadable at boot; serving {', '.join(rolled_back)}"
        else:
            event = Event.BOOT_SERVING
            detail = f"serving {', '.join(r.model_id for r in self.state.models)} after restart"
        self.lifecycle.fire(event, generation=generation, detail=detail, best_effort=True)

    async def _try_load_installed(self, record: InstallRecord) -> Runtime | None:
        """Loads an installed release under the crash guard; None (logged) if it cannot be."""
        try:
            self.lifecycle.fire(
                Event.BOOT_LOAD_STARTED,
                generation=record.generation,
                detail=f"loading {record.model_id}",
                attempt=attempt_of(record, record.generation),
                best_effort=True,
            )
        except RuntimeCrashedWhileLoading as exc:
            log.error("installed release %s is not loaded: %s", record.model_id, exc)
            return None
        try:
            runtime = await self.steps.load_installed(record, self.settings)
        except REFUSALS as exc:
            self.lifecycle.hold(self.state.load_ended(loaded=False))
            log.error("installed release %s cannot be loaded: %s", record.model_id, exc)
            return None
        except BaseException:
            self.lifecycle.hold(self.state.load_ended(loaded=False))
            raise
        self.lifecycle.hold(self.state.load_ended(loaded=True))
        return runtime

    # -- update ------------------------------------------------------------------------

    async def apply(
        self,
        nudge: device_pb2.DesiredState,
        verifier: UptaneVerifier,
        stub: device_pb2_grpc.DeviceServiceStub,
    ) -> None:
        """Verifies what the repositories assign and installs it; a refusal keeps the model it
        would have replaced serving. A TransientFailure propagates, the phase where it stopped,
        for the caller to retry.

        ``nudge`` only says something changed; what to install comes from verified metadata.
        """
        hint = nudge.generation
        if hint <= self.state.applied_generation:
            log.info("generation %d already applied (%d)", hint, self.state.applied_generation)
            return
        if hint == self.state.desired_generation and self.state.phase == S.DEVICE_STATE_FAILED:
            # Refused for a reason retrying cannot fix; wait for the operator's next deployment.
            log.info("generation %d was refused before: %s", hint, self.state.last_error)
            return
        self.lifecycle.fire(
            Event.NUDGED,
            replace(self.state, desired_generation=hint),
            generation=hint,
            detail=f"verifying generation {hint}",
        )
        try:
            with typed_os_errors():  # python-tuf writes the metadata it trusts
                assignment = await asyncio.to_thread(verifier.refresh)
            if assignment.generation <= self.state.applied_generation:
                if assignment.generation < self.state.applied_generation:
                    raise rel.ReplayedMetadata(
                        f"director generation {assignment.generation} is below the applied "
                        f"{self.state.applied_generation}"
                    )
                self._settle(
                    Event.SETTLED_SERVING, self.state, self.state.applied_generation, "nothing new to install"
                )
                if hint > assignment.generation:
                    # The signed metadata is not at the announced generation yet: nothing was
                    # applied, so say so, and look again (the caller retries transient errors).
                    raise ControlPlaneUnavailable(
                        f"the director's metadata is at generation {assignment.generation}, "
                        f"the nudge announced {hint}"
                    )
                return
            await self._apply_assignment(assignment, stub)
        except TransientFailure:
            raise  # the phase stays where it is and the caller retries
        except REFUSALS as exc:
            self._refuse(hint, exc)

    def _refuse(self, generation: int, exc: BaseException, *, model: str = "") -> None:
        what = f"{model}: " if model else ""
        log.error("refused generation %d: %s%s: %s", generation, what, type(exc).__name__, exc)
        self.lifecycle.fire(
            Event.REFUSED,
            generation=generation,
            detail=f"{what}{type(exc).__name__}: {exc}",
            error=f"{what}{exc}",
            error_kind=type(exc).__name__,
        )

    def _settle(self, event: Event, state: AgentState, generation: int, detail: str) -> None:
        """Nothing (more) to do: ACTIVE when a model serves, IDLE when none does (an ACTIVE
        report tells the control plane ``generation`` was applied)."""
        if not state.models:
            event = Event.SETTLED_EMPTY
        self.lifecycle.fire(event, state, generation=generation, detail=detail)

    async def _apply_assignment(
        self, assignment: Assignment, stub: device_pb2_grpc.DeviceServiceStub
    ) -> None:
        """The config put in force (models reloaded when their load settings change), then each
        assigned release installed (or kept), each unassigned model removed; the generation
        counts as applied only when the config is in force and every model is as assigned.

        Everything that can refuse the whole generation (the config, the pins, a reload) is
        decided before anything changes."""
        generation = assignment.generation
        config = signed_config(assignment)
        settings = effective_settings(self.config, config)
        pins = release_pins(assignment)
        serving = Serving(
            state=self.state,
            settings=self.settings,
            loaded_with=self.steps.loaded_with,
            is_loaded=self._is_loaded,
        )
        todo = plan(
            assignment,
            pins,
            settings,
            profile=await self._selection_profile(),
            formats=supported_formats(),
            serving=serving,
            on_selection=self._selected,
        )
        adapters.check_plan(todo, assignment.releases, self.state)
        # An adapter is not loaded again on its own: it follows its base's runtime.
        todo.keep += [r for r in todo.reload if r.adapter_of]
        todo.reload = [r for r in todo.reload if not r.adapter_of]
        await self.steps.reload(todo.reload, settings, generation)
        await adapters.reattach(self.steps, self.state, [r.bundle for r in todo.reload])
        self._put_in_force(config, settings, todo.keep, generation, pin_overridden=pin_overridden(assignment))
        refused = todo.refused[0] if todo.refused else None
        for release, selection in todo.install:
            self.selection = selection  # the FETCHING transition reports this release's choice
            try:
                if release.adapter_base is not None:
                    await adapters.install(self.steps, release, selection, generation, stub)
                else:
                    await self.steps.install(release, selection, generation, stub, settings)
            except TransientFailure:
                raise
            except REFUSALS as exc:
                log.error("refused %s@%d: %s: %s", release.name, release.version, type(exc).__name__, exc)
                refused = refused or (release.name, exc)
        assigned = {release.name for release in assignment.releases}
        needed = adapters.needed_bases(assignment.releases)
        for record in self.state.models:
            if record.bundle in assigned:
                continue
            if record.bundle in needed:
                refused = refused or (
                    record.bundle,
                    adapters.AdapterBaseNeeded(record.model_id, needed[record.bundle]),
                )
                continue
            if record.adapter_of:
                await adapters.unload(self.models, record)
            await self.steps.remove(record.bundle, generation)
        self.steps.collect_garbage(keep_partial=False)
        if refused is not None:
            self._refuse(generation, refused[1], model=refused[0])
            return
        served = ", ".join(f"{r.model_id} ({r.variant})" for r in self.state.models) or "no model"
        applied = replace(self.state, desired_generation=generation, applied_generation=generation)
        self._settle(Event.SETTLED_SERVING, applied, generation, f"serving {served}")

    def _is_loaded(self, name: str) -> bool:
        """A model's runtime is in the table, or an adapter is loaded over its base."""
        record = self.state.model(name)
        if record is not None and record.adapter_of:
            return adapters.is_loaded(self.models, record)
        return self.models.get(name) is not None

    def _selected(self, selection: Selection) -> None:
        self.selection = selection

    def _put_in_force(
        self,
        config: common_pb2.DeviceConfig | None,
        settings: EffectiveSettings,
        kept: list[InstallRecord],
        generation: int,
        *,
        pin_overridden: bool = False,
    ) -> None:
        """The config is in force from here: live settings applied, persisted with the records
        of the models it left serving (a crash from here on boots with it)."""
        state = self.state
        for record in kept:
            state = state.updated(record)
        state = state.with_config(config)
        if settings != self.settings:
            self._apply_settings(settings)
        if state.device_config == self.state.device_config:
            self.lifecycle.hold(state)  # persisted with the generation's next transition
            return
        detail = (
            f"device config in force: {describe_config(config)}"
            if config is not None
            else "device config removed: the command line's settings apply"
        )
        if pin_overridden:
            detail += " (its pin is overridden by the director's pin)"
        self.lifecycle.fire(Event.CONFIG_IN_FORCE, state, generation=generation, detail=detail)
