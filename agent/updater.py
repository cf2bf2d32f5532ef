"""The update state machine: verify → fetch → install → test → activate, or refuse and keep serving.

Modelled on Mender's client: every transition is persisted before the next step, so a crash
at any point restarts into a known phase; the active model is replaced only after its
successor loaded and answered a smoke test, so the device serves the old or the new model,
never neither.
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
from agent.runtimes.registry import load_runtime, supported_formats
from agent.selection import Pin, Selection, select_variant
from agent.serving import ActiveModel
from agent.state import AgentState, InstallRecord, retained, save_state
from agent.uptane_client import Assignment, UptaneVerifier
from protos.fleet import release as rel
from protos.fleet.v1 import common_pb2, device_pb2, device_pb2_grpc

log = logging.getLogger(__name__)

FOLDER_FORMATS = frozenset({common_pb2.MODEL_FORMAT_ONNX, common_pb2.MODEL_FORMAT_MLX})
"""Formats whose variants ship as a folder packed into one tar (controlplane.archive_pack)."""

S = common_pb2
PhaseListener = Callable[[AgentState, int, str], None]
"""Called after every persisted transition with (state, generation, detail)."""


class Updater:
    """Applies desired states one at a time and restores the active model at boot."""

    def __init__(
        self,
        *,
        config: AgentConfig,
        store: ArtifactStore,
        active: ActiveModel,
        state: AgentState,
        on_transition: PhaseListener,
        available_ram: Callable[[], int | None],
        hardware: HardwareProfile | None = None,
    ) -> None:
        """``hardware`` replaces detection (tests); otherwise ``restore`` detects it once, or reads
        ``config.hardware_profile_path``. ``available_ram`` refreshes the detected free RAM at
        each selection, since what is free at boot is not what is free at the next release."""
        self.config = config
        self.store = store
        self.active = active
        self.state = state
        self.on_transition = on_transition
        self.available_ram = available_ram
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
        if self._hardware_is_override:
            return profile  # the operator's figures win over live measurement
        live = self.available_ram()
        return profile if live is None else replace(profile, ram_available_bytes=live)

    async def restore(self) -> None:
        """Loads the installed model, offline: the control plane need not be up."""
        await self.hardware()
        await self._load_at_boot()
        # A crash between activation and garbage collection leaves an unused artifact behind.
        kept = retained(self.state, budget_bytes=self.config.artifact_budget_bytes)
        removed = self.store.collect_garbage(
            {r.artifact_sha256 for r in kept if r is not None}, keep_partial=True
        )
        if removed:
            log.info("removed artifacts left by an interrupted update: %s", ", ".join(removed))

    async def _load_at_boot(self) -> None:
        for record in (self.state.active, self.state.previous):
            if record is None:
                continue
            try:
                runtime = await self._load_installed(record)
            except (AgentError, rel.ReleaseError, RuntimeFailure, OSError) as exc:
                log.error("installed release %s cannot be loaded: %s", record.model_id, exc)
                continue
            self.active.swap(runtime)
            if record is not self.state.active:
                self._transition(
                    replace(self.state.with_phase(S.DEVICE_STATE_ROLLED_BACK), active=record, previous=None),
                    generation=record.generation,
                    detail=f"active release unloadable at boot; serving {record.model_id}",
                )
            else:
                self._transition(
                    self.state.with_phase(S.DEVICE_STATE_ACTIVE),
                    generation=record.generation,
                    detail=f"serving {record.model_id} after restart",
                )
            return

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
        runtime = await asyncio.to_thread(load)
        try:
            await asyncio.to_thread(runtime.smoke_test)
        except BaseException:
            await asyncio.to_thread(runtime.unload)
            raise
        if self.config.keep_alive_seconds is not None:
            return KeepAliveRuntime(runtime, reload=load, keep_alive_s=self.config.keep_alive_seconds)
        return runtime

    # -- update ------------------------------------------------------------------------

    async def apply(
        self,
        nudge: device_pb2.DesiredState,
        verifier: UptaneVerifier,
        stub: device_pb2_grpc.DeviceServiceStub,
    ) -> None:
        """Verifies what the repositories assign and installs it; a refusal keeps the active model.

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
            if assignment is None or assignment.generation <= self.state.applied_generation:
                if assignment is not None and assignment.generation < self.state.applied_generation:
                    raise rel.ReplayedMetadata(
                        f"director generation {assignment.generation} is below the applied "
                        f"{self.state.applied_generation}"
                    )
                self._settle(hint)
                return
            await self._install(assignment, stub, signed_pin(assignment))
        except ControlPlaneUnavailable:
            raise  # transient: the phase stays where it is and the caller retries
        except (AgentError, rel.ReleaseError, RuntimeFailure, OSError) as exc:
            log.error("refused generation %d: %s: %s", hint, type(exc).__name__, exc)
            self._transition(
                self.state.with_phase(S.DEVICE_STATE_FAILED, error=str(exc), error_kind=type(exc).__name__),
                generation=hint,
                detail=f"{type(exc).__name__}: {exc}",
            )

    def _settle(self, generation: int) -> None:
        """Nothing new to install: report the phase that matches what serves."""
        phase = S.DEVICE_STATE_ACTIVE if self.state.active else S.DEVICE_STATE_IDLE
        self._transition(self.state.with_phase(phase), generation=generation, detail="nothing new to install")

    async def _install(
        self,
        assignment: Assignment,
        stub: device_pb2_grpc.DeviceServiceStub,
        pin: Pin | None,
    ) -> None:
        generation = assignment.generation
        verified = assignment.release
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
        active = self.state.active
        if (
            active is not None
            and (active.bundle, active.version, active.artifact_sha256)
            == (verified.name, verified.version, info.sha256)
            and self.active.current() is not None
        ):
            # Re-selection (a pin changed) chose what already serves: nothing to fetch or reload.
            self._transition(
                replace(
                    self.state.with_phase(S.DEVICE_STATE_ACTIVE),
                    active=replace(active, generation=generation),
                    desired_generation=generation,
                    applied_generation=generation,
                ),
                generation=generation,
                detail=f"{selection.reason}; already serving it",
            )
            return
        self._transition(
            replace(self.state.with_phase(S.DEVICE_STATE_FETCHING), desired_generation=generation),
            generation=generation,
            detail=selection.reason,
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
        )

        self._transition(self.state.with_phase(S.DEVICE_STATE_TESTING), generation=generation)
        runtime = await self._load_and_test(record, path)

        old = self.active.swap(runtime)
        previous = (
            self.state.active if self.state.active and self.state.active != record else self.state.previous
        )
        self._transition(
            replace(
                self.state.with_phase(S.DEVICE_STATE_ACTIVE),
                active=record,
                previous=previous,
                applied_generation=generation,
            ),
            generation=generation,
            detail=f"serving {record.model_id} ({variant.id})",
        )
        if old is not None and old is not runtime:
            # In-flight requests on the old model finish before it is unloaded.
            await asyncio.to_thread(self.active.retire, old, timeout=120)
        kept = retained(self.state, budget_bytes=self.config.artifact_budget_bytes)
        if self.state.previous is not None and self.state.previous not in kept:
            self._transition(
                replace(self.state, previous=None), generation=generation, detail="over disk budget"
            )
        removed = self.store.collect_garbage({r.artifact_sha256 for r in kept if r is not None})
        if removed:
            log.info("removed unused artifacts: %s", ", ".join(removed))


def signed_pin(assignment: Assignment) -> Pin | None:
    """The operator's pin as the director signed it into this device's targets (never the
    unsigned nudge); a malformed one is a refusal, not a silent "no pin"."""
    if assignment.pin is None:
        return None
    try:
        return Pin.from_message(assignment.pin)
    except ValueError as exc:
        raise rel.MalformedMetadata(f"director targets carry an unusable pin: {exc}") from exc
