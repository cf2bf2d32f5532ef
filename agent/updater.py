"""The update state machine: verify → fetch → install → test → activate, or refuse and keep serving.

Modelled on Mender's client: every transition is persisted before the next step, so a crash
at any point restarts into a known phase; a model is replaced only after its successor
loaded and answered a smoke test, so each model serves its old or its new release, never
neither. A device holds several models (one release per bundle name): a generation installs
each assigned release that changed, removes the models no longer assigned, and leaves the
rest serving untouched.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import replace
from functools import partial
from pathlib import Path

from agent.archive import model_folder
from agent.artifacts import ArtifactStore
from agent.config import AgentConfig
from agent.errors import AgentError, ControlPlaneUnavailable
from agent.hardware import HardwareProfile, detect_hardware, load_profile_override
from agent.runtimes.base import Runtime, RuntimeFailure
from agent.runtimes.keep_alive import KeepAliveRuntime
from agent.runtimes.memory_budget import MemoryBudget, ModelMemoryExhausted
from agent.runtimes.registry import load_runtime, supported_formats
from agent.selection import Pin, PinNotHonoured, Selection, memory_needed, select_variant
from agent.serving import ModelTable
from agent.state import AgentState, InstallRecord, retained, save_state
from agent.uptane_client import Assignment, UptaneVerifier
from protos.fleet import release as rel
from protos.fleet.v1 import common_pb2, device_pb2, device_pb2_grpc

log = logging.getLogger(__name__)

FOLDER_FORMATS = frozenset({common_pb2.MODEL_FORMAT_ONNX, common_pb2.MODEL_FORMAT_MLX})
"""Formats whose variants ship as a folder packed into one tar (controlplane.archive_pack)."""

REFUSALS = (AgentError, rel.ReleaseError, RuntimeFailure, ModelMemoryExhausted, OSError)
"""What refuses one model's release (reported; its current release keeps serving)."""

S = common_pb2
PhaseListener = Callable[[AgentState, int, str], None]
"""Called after every persisted transition with (state, generation, detail)."""


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
    ) -> None:
        """``hardware`` replaces detection (tests); otherwise ``restore`` detects it once, or reads
        ``config.hardware_profile_path``. ``available_ram`` refreshes the detected free RAM at
        each selection, since what is free at boot is not what is free at the next release.
        ``budget`` bounds what the models hold in memory at once (None: unlimited)."""
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

    # -- persistence -------------------------------------------------------------------

    def _transition(self, state: AgentState, *, generation: int, detail: str = "") -> None:
        save_state(self.config.state_path, state)
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

    async def restore(self) -> None:
        """Loads the installed models, offline: the control plane need not be up."""
        await self.hardware()
        await self._load_at_boot()
        # A crash between activation and garbage collection leaves an unused artifact behind.
        self._collect_garbage(keep_partial=True)

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
                served.append(record.bundle)
        if not served:
            return
        generation = max(r.generation for r in self.state.models)
        if rolled_back:
            self._transition(
                self.state.with_phase(S.DEVICE_STATE_ROLLED_BACK),
                generation=generation,
                detail=f"installed release unloadable at boot; serving {', '.join(rolled_back)}",
            )
        else:
            self._transition(
                self.state.with_phase(S.DEVICE_STATE_ACTIVE),
                generation=generation,
                detail=f"serving {', '.join(r.model_id for r in self.state.models)} after restart",
            )

    async def _try_load_installed(self, record: InstallRecord) -> Runtime | None:
        try:
            return await self._load_installed(record)
        except REFUSALS as exc:
            log.error("installed release %s cannot be loaded: %s", record.model_id, exc)
            return None

    async def _load_installed(self, record: InstallRecord) -> Runtime:
        # The artifact was hashed against signed metadata before it entered the read-only
        # store; at boot its size is re-checked, not its hash, so a large model starts fast.
        path = self.store.path(record.artifact_sha256)
        if path.stat().st_size != record.length:
            raise rel.ArtifactLengthMismatch(f"installed artifact of {record.model_id} has the wrong size")
        return await self._load_and_test(record, path)

    async def _load_and_test(self, record: InstallRecord, path: Path) -> Runtime:
        if record.model_format in FOLDER_FORMATS:
            assert self.store.unpacked_dir is not None, "folder variants need an unpacked_dir"
            path = await asyncio.to_thread(
                model_folder,
                path,
                self.store.unpacked_dir / record.artifact_sha256,
                max_total_bytes=record.length,
            )
        load = partial(
            load_runtime,
            fmt=record.model_format,
            model_path=path,
            model_id=record.bundle,
            n_ctx=self.config.n_ctx,
            n_threads=self.config.n_threads,
        )
        runtime = await asyncio.to_thread(
            self.budget.load, name=record.bundle, footprint_bytes=record.footprint_bytes, factory=load
        )
        try:
            await asyncio.to_thread(runtime.smoke_test)
        except BaseException:
            await asyncio.to_thread(runtime.unload)
            raise
        if self.config.keep_alive_seconds is None and self.budget.limit_bytes is None:
            return runtime  # held until replaced: nothing would ever unload it
        return KeepAliveRuntime(
            runtime,
            reload=load,
            keep_alive_s=self.config.keep_alive_seconds,
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
                self._settle(hint)
                return
            await self._apply_assignment(assignment, stub)
        except ControlPlaneUnavailable:
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

    def _settle(self, generation: int) -> None:
        """Nothing new to install: report the phase that matches what serves."""
        phase = S.DEVICE_STATE_ACTIVE if self.state.models else S.DEVICE_STATE_IDLE
        self._transition(self.state.with_phase(phase), generation=generation, detail="nothing new to install")

    async def _apply_assignment(
        self, assignment: Assignment, stub: device_pb2_grpc.DeviceServiceStub
    ) -> None:
        """Each assigned release installed (or kept), each unassigned model removed; the
        generation counts as applied only when every model is as assigned."""
        generation = assignment.generation
        pins = release_pins(assignment)
        refused: tuple[str, BaseException] | None = None
        for release in assignment.releases:
            try:
                await self._install(release, generation, stub, pins.get(release.name))
            except ControlPlaneUnavailable:
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

    async def _install(
        self,
        verified: rel.VerifiedRelease,
        generation: int,
        stub: device_pb2_grpc.DeviceServiceStub,
        pin: Pin | None,
    ) -> None:
        selection = select_variant(
            verified,
            hardware=await self._selection_profile(),
            supported_formats=supported_formats(),
            n_ctx=self.config.n_ctx,
            pin=pin,
        )
        self.selection = selection
        variant = selection.variant
        info = verified.artifacts[variant.artifact]
        current = self.state.model(verified.name)
        if (
            current is not None
            and (current.version, current.artifact_sha256) == (verified.version, info.sha256)
            and self.models.get(verified.name) is not None
        ):
            # Unchanged, or re-selection (a pin changed) chose what already serves: nothing to
            # fetch or reload.
            self.state = replace(
                self.state,
                models=tuple(
                    replace(r, generation=generation) if r is current else r for r in self.state.models
                ),
            )
            log.info("%s: %s; already serving it", verified.name, selection.reason)
            return
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
            memory_bytes=memory_needed(variant, self.config.n_ctx),
        )

        self._transition(self.state.with_phase(S.DEVICE_STATE_TESTING), generation=generation)
        runtime = await self._load_and_test(record, path)

        old = self.models.put(runtime)
        self._transition(
            self.state.installing(record).with_phase(S.DEVICE_STATE_TESTING),
            generation=generation,
            detail=f"serving {record.model_id} ({variant.id})",
        )
        if old is not None and old is not runtime:
            # In-flight requests on the old release finish before it is unloaded.
            await asyncio.to_thread(self.models.retire, old, timeout=120)

    async def _remove(self, name: str, generation: int) -> None:
        """The model is no longer assigned: stop serving it (after its requests finish) and
        forget it, rollback copy included; its files go with the next garbage collection."""
        old = self.models.remove(name)
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
            self.state = self.state.without_previous(kept)
            save_state(self.config.state_path, self.state)
        removed = self.store.collect_garbage({r.artifact_sha256 for r in kept}, keep_partial=keep_partial)
        if removed:
            log.info("removed unused artifacts: %s", ", ".join(removed))


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
    """The operator's pin as the director signed it into this device's targets (never the
    unsigned nudge); a malformed one is a refusal, not a silent "no pin"."""
    if assignment.pin is None:
        return None
    try:
        return Pin.from_message(assignment.pin)
    except ValueError as exc:
        raise rel.MalformedMetadata(f"director targets carry an unusable pin: {exc}") from exc
