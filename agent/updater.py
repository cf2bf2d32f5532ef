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
from pathlib import Path

from tuf.api.metadata import Root

from agent.artifacts import ArtifactStore
from agent.config import AgentConfig
from agent.errors import AgentError, ControlPlaneUnavailable, DesiredStateMismatch
from agent.runtimes.base import Runtime, RuntimeFailure
from agent.runtimes.registry import load_runtime, supported_formats
from agent.selection import select_variant
from agent.serving import ActiveModel
from agent.state import AgentState, InstallRecord, save_state
from protos.fleet import release as rel
from protos.fleet.fsio import atomic_write_bytes
from protos.fleet.v1 import common_pb2, device_pb2, device_pb2_grpc

log = logging.getLogger(__name__)

S = common_pb2
PhaseListener = Callable[[AgentState, int, str], None]
"""Called after every persisted transition with (state, generation, detail)."""


class Updater:
    """Applies desired states one at a time and restores the active model at boot."""

    def __init__(
        self,
        *,
        config: AgentConfig,
        root: Root,
        store: ArtifactStore,
        active: ActiveModel,
        state: AgentState,
        on_transition: PhaseListener,
        available_ram: Callable[[], int | None],
    ) -> None:
        self.config = config
        self.root = root
        self.store = store
        self.active = active
        self.state = state
        self.on_transition = on_transition
        self.available_ram = available_ram
        self.progress: tuple[int, int] = (0, 0)

    # -- persistence -------------------------------------------------------------------

    def _transition(self, state: AgentState, *, generation: int, detail: str = "") -> None:
        save_state(self.config.state_path, state)
        self.state = state
        self.on_transition(state, generation, detail)

    # -- boot --------------------------------------------------------------------------

    async def restore(self) -> None:
        """Loads the installed model, offline: the control plane need not be up."""
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
        metadata = (self.config.release_dir / record.release_file).read_bytes()
        # Signatures are re-checked; expiry is not: an offline device keeps serving what it had.
        verified = rel.verify_release(metadata, root=self.root, check_expiry=False)
        variant = verified.variant(record.variant)
        info = verified.artifacts[variant.artifact]
        path = self.store.path(record.artifact_sha256)
        if info.sha256 != record.artifact_sha256 or path.stat().st_size != info.length:
            raise rel.ArtifactLengthMismatch(f"installed artifact of {record.model_id} does not match")
        return await self._load_and_test(record, path)

    async def _load_and_test(self, record: InstallRecord, path: Path) -> Runtime:
        runtime = await asyncio.to_thread(
            load_runtime,
            fmt=record.model_format,
            model_path=path,
            model_id=record.bundle,
            n_ctx=self.config.n_ctx,
            n_threads=self.config.n_threads,
        )
        try:
            await asyncio.to_thread(runtime.smoke_test)
        except BaseException:
            await asyncio.to_thread(runtime.unload)
            raise
        return runtime

    # -- update ------------------------------------------------------------------------

    async def apply(
        self,
        desired: device_pb2.DesiredState,
        stub: device_pb2_grpc.DeviceServiceStub,
        metadata: tuple[tuple[str, str], ...],
    ) -> None:
        """Installs a desired state; on any refusal the active model keeps serving."""
        generation = desired.generation
        if generation <= self.state.applied_generation:
            log.info("desired generation %d already applied (%d)", generation, self.state.applied_generation)
            return
        if generation == self.state.desired_generation and self.state.phase == S.DEVICE_STATE_FAILED:
            # Refused for a reason retrying cannot fix; wait for the operator's next deployment.
            log.info("desired generation %d was refused before: %s", generation, self.state.last_error)
            return
        self._transition(
            replace(self.state.with_phase(S.DEVICE_STATE_VERIFYING), desired_generation=generation),
            generation=generation,
            detail=f"verifying {desired.bundle.name}@{desired.bundle.version}",
        )
        try:
            await self._apply(desired, stub, metadata)
        except ControlPlaneUnavailable:
            raise  # transient: the phase stays where it is and the caller retries
        except (AgentError, rel.ReleaseError, RuntimeFailure, OSError) as exc:
            log.error("refused generation %d: %s: %s", generation, type(exc).__name__, exc)
            self._transition(
                replace(
                    self.state.with_phase(
                        S.DEVICE_STATE_FAILED, error=str(exc), error_kind=type(exc).__name__
                    ),
                    applied_generation=self.state.applied_generation,
                ),
                generation=generation,
                detail=f"{type(exc).__name__}: {exc}",
            )

    async def _apply(
        self,
        desired: device_pb2.DesiredState,
        stub: device_pb2_grpc.DeviceServiceStub,
        metadata: tuple[tuple[str, str], ...],
    ) -> None:
        generation = desired.generation
        verified = rel.verify_release(desired.release_metadata, root=self.root)
        if (verified.name, verified.version) != (desired.bundle.name, desired.bundle.version):
            raise DesiredStateMismatch(
                f"deployment names {desired.bundle.name}@{desired.bundle.version} but its signed "
                f"metadata is {verified.name}@{verified.version}"
            )
        selection = select_variant(
            verified, supported_formats=supported_formats(), available_ram_bytes=self.available_ram()
        )
        variant = selection.variant
        info = verified.artifacts[variant.artifact]
        if desired.artifact_digests.get(variant.artifact, info.sha256) != info.sha256:
            raise DesiredStateMismatch(
                f"deployment digest for {variant.artifact} differs from the signed hash"
            )

        self._transition(
            self.state.with_phase(S.DEVICE_STATE_FETCHING), generation=generation, detail=selection.reason
        )

        def progress(done: int, total: int) -> None:
            self.progress = (done, total)

        path = await self.store.fetch(stub, info, metadata=metadata, progress=progress)

        self._transition(self.state.with_phase(S.DEVICE_STATE_INSTALLING), generation=generation)
        release_file = f"{verified.name}-{verified.version}.json"
        atomic_write_bytes(self.config.release_dir / release_file, verified.metadata)
        record = InstallRecord(
            bundle=verified.name,
            version=verified.version,
            generation=generation,
            variant=variant.id,
            model_format=variant.format,
            artifact_sha256=info.sha256,
            release_file=release_file,
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
        keep = {r.artifact_sha256 for r in (self.state.active, self.state.previous) if r is not None}
        removed = self.store.collect_garbage(keep)
        if removed:
            log.info("removed unused artifacts: %s", ", ".join(removed))
