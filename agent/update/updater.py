"""The update state machine: verify → fetch → install → test → activate, or refuse and keep serving.

Modelled on Mender's client: every transition is persisted before the next step, so a crash
at any point restarts into a known phase; a model is replaced only after its successor
loaded and answered a smoke test, so each model serves its old or its new release, never
neither. A device holds several models (one release per bundle name): a generation installs
each assigned release that changed, removes the models no longer assigned, and leaves the
rest serving untouched.

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
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Protocol

from edgefleet.agent.config import AgentConfig, EffectiveSettings, LoadSettings, effective_settings
from edgefleet.agent.device.hardware import HardwareProfile, detect_hardware, load_profile_override
from edgefleet.agent.runtimes.base import Runtime, RuntimeFailure
from edgefleet.agent.runtimes.keep_alive import KeepAliveRuntime
from edgefleet.agent.runtimes.memory_budget import MemoryBudget, ModelMemoryExhausted
from edgefleet.agent.runtimes.model_table import ModelTable
from edgefleet.agent.runtimes.registry import load_runtime, supported_formats
from edgefleet.agent.update.archive import model_folder
from edgefleet.agent.update.artifacts import ArtifactStore
from edgefleet.agent.update.errors import AgentError, ControlPlaneUnavailable
from edgefleet.agent.update.selection import Pin, PinNotHonoured, Selection, memory_needed, select_variant
from edgefleet.agent.update.state import (
    AgentState,
    InstallRecord,
    LoadAttempt,
    StateNotSaved,
    retained,
    save_state,
)
from edgefleet.agent.update.uptane_client import Assignment, UptaneVerifier
from edgefleet.protos.fleet import release as rel
from edgefleet.protos.fleet.device_config import InvalidConfig, describe_config, is_empty, validate_config
from edgefleet.protos.fleet.v1 import common_pb2, device_pb2, device_pb2_grpc

log = logging.getLogger(__name__)

FOLDER_FORMATS = frozenset({common_pb2.MODEL_FORMAT_ONNX, common_pb2.MODEL_FORMAT_MLX})
"""Formats whose variants ship as a folder packed into one tar (edgefleet.controlplane.build.archive_pack)."""

REFUSALS = (AgentError, rel.ReleaseError, RuntimeFailure, ModelMemoryExhausted, OSError)
"""What refuses one model's release (reported; its current release keeps serving)."""

S = common_pb2
PhaseListener = Callable[[AgentState, int, str], None]
"""Called after every persisted transition with (state, generation, detail)."""
SettingsListener = Callable[[EffectiveSettings], None]
"""Called with the settings in force at boot and whenever a device config changes them."""


class RuntimeCrashedWhileLoading(AgentError):
    """The agent process died inside this release's load or smoke test in two processes in a
    row (a runtime segfault, the OOM killer): refused on this device until a newer generation."""


class UnusableConfig(AgentError):
    """The signed device config breaks a rule, or a model cannot run with it; nothing changed."""


class RuntimeLoader(Protocol):
    """Loads one model file (edgefleet.agent.runtimes.registry.load_runtime; tests pass their own)."""

    def __call__(
        self, *, fmt: int, model_path: Path, model_id: str, n_ctx: int, n_threads: int | None
    ) -> Runtime: ...


@dataclass
class _Plan:
    """What a generation does to each assigned release, decided before anything changes."""

    keep: list[InstallRecord] = field(default_factory=list)  # serving as it should
    reload: list[InstallRecord] = field(default_factory=list)  # same artifact, new load settings
    install: list[tuple[rel.VerifiedRelease, Selection]] = field(default_factory=list)
    refused: list[tuple[str, BaseException]] = field(default_factory=list)  # (bundle name, why)


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
        self.state = state
        self.on_transition = on_transition
        self.available_ram = available_ram
        self.budget = budget or MemoryBudget(None)
        self._hardware = hardware
        self._hardware_is_override = hardware is not None or config.hardware_profile_path is not None
        self.selection: Selection | None = None
        """The latest variant choice, for status reports; None until a release was selected."""
        self.on_settings = on_settings
        self.loader = loader
        self.settings = effective_settings(config, None)
        """The settings in force; ``restore`` lays the persisted device config over them."""
        self._loaded_with: dict[str, LoadSettings] = {}
        """Per model name, what the runtime serving it was loaded with."""
        self.state_writes_failed = 0
        """State writes the disk refused (a full disk): the update waiting on them is retried."""
        self.on_state_not_saved = on_state_not_saved

    # -- persistence -------------------------------------------------------------------

    def _transition(self, state: AgentState, *, generation: int, detail: str = "") -> None:
        """Persists ``state``, then makes it current and reports it; StateNotSaved leaves the
        current state as it was (the step it would record does not happen)."""
        self._save(state)
        self.state = state
        self.on_transition(state, generation, detail)

    def _save(self, state: AgentState) -> None:
        try:
            save_state(self.config.state_path, state)
        except StateNotSaved as exc:
            self.state_writes_failed += 1
            if self.on_state_not_saved is not None:
                self.on_state_not_saved(exc)
            raise

    def _save_best_effort(self, state: AgentState, *, why: str) -> None:
        """For records whose loss costs nothing but a repeat (boot steps): log, count, go on."""
        try:
            self._save(state)
        except StateNotSaved as exc:
            log.error("%s: %s; serving with the state in memory", why, exc)

    def _boot_transition(self, state: AgentState, *, generation: int, detail: str) -> None:
        self._save_best_effort(state, why=detail)
        self.state = state
        self.on_transition(state, generation, detail)

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
            self._collect_garbage(keep_partial=True)

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
            self.state = self.state.with_config(None)
            self._save_best_effort(self.state, why="dropping the unusable device config")
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
            runtime = await self._try_load_installed(record)
            if runtime is None and (rollback := self.state.previous_of(record.bundle)) is not None:
                runtime = await self._try_load_installed(rollback)
                if runtime is not None:
                    self.state = self.state.rolled_back(record.bundle)
                    rolled_back.append(rollback.model_id)
            if runtime is not None:
                self.models.put(runtime)
                self._loaded_with[record.bundle] = self.settings.load
                served.append(record.bundle)
        if not served:
            self._save_best_effort(self.state, why="boot loads ended")
            return
        # What was applied, not the newest model's generation: a kill after a model was swapped
        # in but before its generation was applied must not report that generation as applied
        # (the nudge applies it again, finding the model already installed).
        generation = self.state.applied_generation
        if rolled_back:
            self._boot_transition(
                self.state.with_phase(S.DEVICE_STATE_ROLLED_BACK),
                generation=generation,
                detail=f"installed release unloadable at boot; serving {', '.join(rolled_back)}",
            )
        else:
            self._boot_transition(
                self.state.with_phase(S.DEVICE_STATE_ACTIVE),
                generation=generation,
                detail=f"serving {', '.join(r.model_id for r in self.state.models)} after restart",
            )

    async def _try_load_installed(self, record: InstallRecord) -> Runtime | None:
        """Loads an installed release under the crash guard; None (logged) if it cannot be."""
        attempt = _attempt_of(record, record.generation)
        crashed = self.state.crash_refused(attempt)
        if crashed is not None:
            log.error("installed release %s is not loaded: %s", record.model_id, _crash_reason(crashed))
            return None
        self._save_best_effort(self.state.load_started(attempt), why=f"loading {record.model_id}")
        self.state = self.state.load_started(attempt)
        try:
            runtime = await self._load_installed(record)
        except REFUSALS as exc:
            self.state = self.state.load_ended(loaded=False)
            log.error("installed release %s cannot be loaded: %s", record.model_id, exc)
            return None
        except BaseException:
            self.state = self.state.load_ended(loaded=False)
            raise
        self.state = self.state.load_ended(loaded=True)
        return runtime

    async def _load_installed(self, record: InstallRecord) -> Runtime:
        # The artifact was hashed against signed metadata before it entered the read-only
        # store; at boot its size is re-checked, not its hash, so a large model starts fast.
        path = self.store.installed(record.artifact_sha256, record.length, what=record.model_id)
        return await self._load_and_test(record, path, self.settings)

    async def _load_and_test(self, record: InstallRecord, path: Path, settings: EffectiveSettings) -> Runtime:
        """Loads through the memory budget, smoke-tests, and wraps the runtime so its keep-alive
        can change later (a device config may set one where the command line set none)."""
        if record.model_format in FOLDER_FORMATS:
            assert self.store.unpacked_dir is not None, "folder variants need an unpacked_dir"
            path = await asyncio.to_thread(
                model_folder,
                path,
                self.store.unpacked_dir / record.artifact_sha256,
                max_total_bytes=record.length,
            )
        load = partial(
            self.loader,
            fmt=record.model_format,
            model_path=path,
            model_id=record.bundle,
            n_ctx=settings.n_ctx,
            n_threads=settings.n_threads,
        )
        runtime = await asyncio.to_thread(
            self.budget.load, name=record.bundle, footprint_bytes=record.footprint_bytes, factory=load
        )
        try:
            await asyncio.to_thread(runtime.smoke_test)
        except BaseException:
            await asyncio.to_thread(runtime.unload)
            raise
        return KeepAliveRuntime(
            runtime,
            reload=load,
            keep_alive_s=settings.keep_alive_seconds,
            budget=self.budget,
            footprint_bytes=record.footprint_bytes,
        )

    # -- update ------------------------------------------------------------------------

    async def apply(
        self,
        nudge: device_pb2.DesiredState,
        verifier: UptaneVerifier,
        stub: device_pb2_grpc.DeviceServiceStub,
    ) -> None:
        """Verifies what the repositories assign and installs it; a refusal keeps the model it
        would have replaced serving.

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
        self._transition(
            replace(self.state.with_phase(S.DEVICE_STATE_VERIFYING), desired_generation=hint),
            generation=hint,
            detail=f"verifying generation {hint}",
        )
        try:
            assignment = await asyncio.to_thread(verifier.refresh)
            if assignment.generation <= self.state.applied_generation:
                if assignment.generation < self.state.applied_generation:
                    raise rel.ReplayedMetadata(
                        f"director generation {assignment.generation} is below the applied "
                        f"{self.state.applied_generation}"
                    )
                self._settle()
                if hint > assignment.generation:
                    # The signed metadata is not at the announced generation yet: nothing was
                    # applied, so say so, and look again (the caller retries transient errors).
                    raise ControlPlaneUnavailable(
                        f"the director's metadata is at generation {assignment.generation}, "
                        f"the nudge announced {hint}"
                    )
                return
            await self._apply_assignment(assignment, stub)
        except (ControlPlaneUnavailable, StateNotSaved):
            raise  # transient: the phase stays where it is and the caller retries
        except REFUSALS as exc:
            self._refuse(hint, exc)

    def _refuse(self, generation: int, exc: BaseException, *, model: str = "") -> None:
        what = f"{model}: " if model else ""
        log.error("refused generation %d: %s%s: %s", generation, what, type(exc).__name__, exc)
        self._transition(
            self.state.with_phase(S.DEVICE_STATE_FAILED, error=f"{what}{exc}", error_kind=type(exc).__name__),
            generation=generation,
            detail=f"{what}{type(exc).__name__}: {exc}",
        )

    def _settle(self) -> None:
        """Nothing new to install: report the phase that matches what serves, with the generation
        applied (an ACTIVE report of any other would tell the control plane it was applied)."""
        phase = S.DEVICE_STATE_ACTIVE if self.state.models else S.DEVICE_STATE_IDLE
        self._transition(
            self.state.with_phase(phase),
            generation=self.state.applied_generation,
            detail="nothing new to install",
        )

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
        plan = await self._plan(assignment, pins, settings)
        await self._reload(plan.reload, settings, generation)
        self._put_in_force(
            config, settings, plan.keep, generation, pin_overridden=_pin_overridden(assignment)
        )
        refused = plan.refused[0] if plan.refused else None
        for release, selection in plan.install:
            try:
                await self._install(release, selection, generation, stub, settings)
            except (ControlPlaneUnavailable, StateNotSaved):
                raise
            except REFUSALS as exc:
                log.error("refused %s@%d: %s: %s", release.name, release.version, type(exc).__name__, exc)
                refused = refused or (release.name, exc)
        assigned = {release.name for release in assignment.releases}
        for record in self.state.models:
            if record.bundle not in assigned:
                await self._remove(record.bundle, generation)
        self._collect_garbage(keep_partial=False)
        if refused is not None:
            self._refuse(generation, refused[1], model=refused[0])
            return
        served = ", ".join(f"{r.model_id} ({r.variant})" for r in self.state.models) or "no model"
        self._transition(
            replace(
                self.state.with_phase(S.DEVICE_STATE_ACTIVE if self.state.models else S.DEVICE_STATE_IDLE),
                desired_generation=generation,
                applied_generation=generation,
            ),
            generation=generation,
            detail=f"serving {served}",
        )

    async def _plan(
        self, assignment: Assignment, pins: dict[str, Pin | None], settings: EffectiveSettings
    ) -> _Plan:
        """Chooses each release's variant under the new settings (``n_ctx`` counts toward what
        fits), and sorts the releases: serving as chosen, to reload, to install, refused."""
        plan = _Plan()
        profile = await self._selection_profile()
        for release in assignment.releases:
            try:
                selection = select_variant(
                    release,
                    hardware=profile,
                    supported_formats=supported_formats(),
                    n_ctx=settings.n_ctx,
                    pin=pins.get(release.name),
                )
            except REFUSALS as exc:
                self._blame_config(release, pins.get(release.name), profile, settings, exc)
                log.error("refused %s@%d: %s: %s", release.name, release.version, type(exc).__name__, exc)
                plan.refused.append((release.name, exc))
                continue
            self.selection = selection
            current = self._serving(release, selection)
            if current is None:
                plan.install.append((release, selection))
                continue
            updated = replace(
                current,
                generation=assignment.generation,
                memory_bytes=memory_needed(selection.variant, settings.n_ctx),
            )
            if self._loaded_with.get(release.name) == settings.load:
                log.info("%s: %s; already serving it", release.name, selection.reason)
                plan.keep.append(updated)
            else:
                plan.reload.append(updated)
        return plan

    def _blame_config(
        self,
        release: rel.VerifiedRelease,
        pin: Pin | None,
        profile: HardwareProfile,
        settings: EffectiveSettings,
        exc: BaseException,
    ) -> None:
        """No variant of a release this device serves fits the new context length, though one
        fits the current one: the config is what the device cannot use, so the whole generation
        is refused (UnusableConfig) before anything changes, as when a reload fails."""
        current = self.state.model(release.name)
        if current is None or current.version != release.version or settings.n_ctx == self.settings.n_ctx:
            return
        try:
            select_variant(
                release,
                hardware=profile,
                supported_formats=supported_formats(),
                n_ctx=self.settings.n_ctx,
                pin=pin,
            )
        except REFUSALS:
            return  # refused under the current settings too: not the config's doing
        raise UnusableConfig(
            f"{release.name}@{release.version} cannot run with n_ctx={settings.n_ctx}: {exc}"
        ) from exc

    def _serving(self, verified: rel.VerifiedRelease, selection: Selection) -> InstallRecord | None:
        """The install record of ``verified`` when the variant chosen is what serves it now
        (unchanged, or a re-selection chose it again): nothing to fetch."""
        info = verified.artifacts[selection.variant.artifact]
        current = self.state.model(verified.name)
        if (
            current is not None
            and (current.version, current.artifact_sha256) == (verified.version, info.sha256)
            and self.models.get(verified.name) is not None
        ):
            return current
        return None

    async def _reload(
        self, records: list[InstallRecord], settings: EffectiveSettings, generation: int
    ) -> None:
        """Loads every model in ``records`` again with the new load settings: all new runtimes
        are loaded and smoke-tested before any is swapped in, so a failure leaves every model on
        its old runtime (its new ones unloaded) and refuses the generation (UnusableConfig).
        Until the swap, old and new runtimes are both in memory; under a memory budget an idle
        old one may be unloaded to make room (it loads again on demand, until retired)."""
        if not records:
            return
        names = ", ".join(r.bundle for r in records)
        self._transition(
            self.state.with_phase(S.DEVICE_STATE_TESTING),
            generation=generation,
            detail=f"loading {names} again with {settings.load.describe()}",
        )
        loaded: list[tuple[InstallRecord, Runtime]] = []
        for record in records:
            try:
                path = self.store.path(record.artifact_sha256)
                loaded.append((record, await self._load_and_test(record, path, settings)))
            except REFUSALS as exc:
                for _, runtime in loaded:
                    await asyncio.to_thread(runtime.unload)
                why = f"{type(exc).__name__}: {exc}"
                raise UnusableConfig(
                    f"{record.model_id} cannot run with {settings.load.describe()}: {why}"
                ) from exc
        retired = []
        for record, runtime in loaded:  # every swap first: no model waits on another's requests
            retired.append(self.models.put(runtime))
            self._loaded_with[record.bundle] = settings.load
            self.state = self.state.updated(record)
        for old in retired:
            if old is not None:  # in-flight requests on the old runtime finish first
                await asyncio.to_thread(self.models.retire, old, timeout=120)

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
            self.state = state  # persisted with the generation's next transition
            return
        detail = (
            f"device config in force: {describe_config(config)}"
            if config is not None
            else "device config removed: the command line's settings apply"
        )
        if pin_overridden:
            detail += " (its pin is overridden by the director's pin)"
        self._transition(state, generation=generation, detail=detail)

    async def _install(
        self,
        verified: rel.VerifiedRelease,
        selection: Selection,
        generation: int,
        stub: device_pb2_grpc.DeviceServiceStub,
        settings: EffectiveSettings,
    ) -> None:
        self.selection = selection  # the FETCHING transition reports this release's choice
        variant = selection.variant
        info = verified.artifacts[variant.artifact]
        attempt = LoadAttempt(
            bundle=verified.name, version=verified.version, artifact_sha256=info.sha256, generation=generation
        )
        crashed = self.state.crash_refused(attempt)
        if crashed is not None:
            raise RuntimeCrashedWhileLoading(_crash_reason(crashed))
        self._transition(
            replace(self.state.with_phase(S.DEVICE_STATE_FETCHING), desired_generation=generation),
            generation=generation,
            detail=f"{verified.name}: {selection.reason}",
        )

        path = await self.store.fetch(stub, info)

        self._transition(self.state.with_phase(S.DEVICE_STATE_INSTALLING), generation=generation)
        record = InstallRecord(
            bundle=verified.name,
            version=verified.version,
            generation=generation,
            variant=variant.id,
            model_format=variant.format,
            artifact_sha256=info.sha256,
            length=info.length,
            memory_bytes=memory_needed(variant, settings.n_ctx),
        )

        # Persisted before the load: a process that dies inside it leaves this marker behind,
        # and the next one counts the crash (AgentState.after_restart).
        self._transition(
            self.state.with_phase(S.DEVICE_STATE_TESTING).load_started(attempt),
            generation=generation,
            detail=f"loading {record.model_id} ({variant.id})",
        )
        try:
            runtime = await self._load_and_test(record, path, settings)
        except BaseException:
            self.state = self.state.load_ended(loaded=False)  # persisted with the refusal
            raise
        self.state = self.state.load_ended(loaded=True)  # persisted with the next transition

        old = self.models.put(runtime)
        self._loaded_with[record.bundle] = settings.load
        try:
            self._transition(
                self.state.installing(record).with_phase(S.DEVICE_STATE_TESTING),
                generation=generation,
                detail=f"serving {record.model_id} ({variant.id})",
            )
        finally:
            if old is not None and old is not runtime:
                # In-flight requests on the old release finish before it is unloaded.
                await asyncio.to_thread(self.models.retire, old, timeout=120)

    async def _remove(self, name: str, generation: int) -> None:
        """The model is no longer assigned: stop serving it (after its requests finish) and
        forget it, rollback copy included; its files go with the next garbage collection."""
        old = self.models.remove(name)
        self._loaded_with.pop(name, None)
        self._transition(
            self.state.without(name).with_phase(S.DEVICE_STATE_INSTALLING),
            generation=generation,
            detail=f"removed {name}",
        )
        if old is not None:
            await asyncio.to_thread(self.models.retire, old, timeout=120)

    def _collect_garbage(self, *, keep_partial: bool) -> None:
        """Deletes artifacts no install record needs; rollback copies over the disk budget
        are forgotten first."""
        kept = retained(self.state, budget_bytes=self.config.artifact_budget_bytes)
        if len(kept) < len(self.state.models) + len(self.state.previous):
            forgotten = self.state.without_previous(kept)
            try:
                self._save(forgotten)
            except StateNotSaved as exc:
                # The file still names the rollback copies: their artifacts must stay.
                log.error("%s; no artifact is collected until the state can be written", exc)
                return
            self.state = forgotten
        removed = self.store.collect_garbage({r.artifact_sha256 for r in kept}, keep_partial=keep_partial)
        if removed:
            log.info("removed unused artifacts: %s", ", ".join(removed))


def _attempt_of(record: InstallRecord, generation: int) -> LoadAttempt:
    return LoadAttempt(
        bundle=record.bundle,
        version=record.version,
        artifact_sha256=record.artifact_sha256,
        generation=generation,
    )


def _crash_reason(crashed: LoadAttempt) -> str:
    return (
        f"the runtime crashed while loading {crashed.model_id} (generation {crashed.generation}): "
        f"the agent died inside that load {crashed.crashes} times; refused on this device until a "
        "newer generation"
    )


def release_pins(assignment: Assignment) -> dict[str, Pin | None]:
    """Which release the signed pin applies to: a runtime pin to every release, a variant pin
    to the releases that have that variant; a variant pin no release has is a refusal."""
    pin = signed_pin(assignment)
    if pin is None:
        return {}
    if pin.format:
        return {release.name: pin for release in assignment.releases}
    pins: dict[str, Pin | None] = {
        release.name: pin
        for release in assignment.releases
        if any(pin.admits(v) for v in release.manifest.variants)
    }
    if assignment.releases and not pins:
        listed = ", ".join(f"{r.name}@{r.version}" for r in assignment.releases)
        raise PinNotHonoured(f"{pin.describe()}, but no assigned release has that variant ({listed})")
    return pins


def signed_pin(assignment: Assignment) -> Pin | None:
    """The operator's pin, as signed into this device's director targets (never the unsigned
    nudge): the director's own pin, else the pin of the signed device config. When both are set
    the director's wins (it is the newer, more specific word: ``fleetctl devices pin``), and the
    overridden config pin is logged. A malformed pin is a refusal, not a silent "no pin"."""
    director = _usable_pin(assignment.pin, "director targets carry")
    config = assignment.config
    from_config = (
        _usable_pin(config.pin, "device config carries") if config and config.HasField("pin") else None
    )
    if director is not None and from_config is not None and director != from_config:
        log.warning(
            "the director's pin (%s) wins over the device config's (%s)",
            director.describe(),
            from_config.describe(),
        )
    return director if director is not None else from_config


def _pin_overridden(assignment: Assignment) -> bool:
    """Both the director and the config signed a pin: the director's applies (``signed_pin``)."""
    config = assignment.config
    director = assignment.pin
    return (
        director is not None
        and bool(director.variant_id or director.format)
        and config is not None
        and config.HasField("pin")
    )


def _usable_pin(message: common_pb2.VariantPin | None, where: str) -> Pin | None:
    if message is None:
        return None
    try:
        return Pin.from_message(message)
    except ValueError as exc:
        raise rel.MalformedMetadata(f"{where} an unusable pin: {exc}") from exc


def signed_config(assignment: Assignment) -> common_pb2.DeviceConfig | None:
    """The device config the director signed, checked against the same rules the control plane
    applies (edgefleet.protos.fleet.device_config): the control plane refuses an invalid config, so one
    arriving here means a compromised director or a stricter agent. None: no config, the
    command line's settings."""
    config = assignment.config
    if config is None or is_empty(config):
        return None
    try:
        validate_config(config)
    except InvalidConfig as exc:
        raise UnusableConfig(f"device config refused: {exc}") from exc
    return config
