"""The steps that change what serves: fetch, install, load and smoke-test, swap in, reload,
remove, and collect the artifacts nothing needs any more.

Each step moves the lifecycle by firing its events (edgefleet.agent.update.lifecycle); the
order of the steps is the updater's. A model is replaced only after its successor loaded and
answered a smoke test, so each model serves its old or its new release, never neither. Local
I/O errors leave here typed by family (errors.typed_os_errors): a full disk is retried, a
read-only one is reported.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Protocol

from edgefleet.agent.config import EffectiveSettings, LoadSettings
from edgefleet.agent.runtimes.base import Runtime
from edgefleet.agent.runtimes.keep_alive import KeepAliveRuntime
from edgefleet.agent.runtimes.memory_budget import MemoryBudget
from edgefleet.agent.runtimes.model_table import ModelTable
from edgefleet.agent.update.archive import model_folder
from edgefleet.agent.update.artifacts import ArtifactStore
from edgefleet.agent.update.errors import TransientFailure, typed_os_errors
from edgefleet.agent.update.lifecycle import Event, Lifecycle
from edgefleet.agent.update.planning import REFUSALS, UnusableConfig
from edgefleet.agent.update.selection import Selection, memory_needed
from edgefleet.agent.update.state import InstallRecord, LoadAttempt, StateNotSaved, retained
from edgefleet.protos.fleet import release as rel
from edgefleet.protos.fleet.v1 import common_pb2, device_pb2_grpc

log = logging.getLogger(__name__)

FOLDER_FORMATS = frozenset({common_pb2.MODEL_FORMAT_ONNX, common_pb2.MODEL_FORMAT_MLX})
"""Formats whose variants ship as a folder packed into one tar (edgefleet.controlplane.build.archive_pack)."""

RETIRE_TIMEOUT_SECONDS = 120
"""How long in-flight requests on a replaced runtime may run before it is unloaded anyway."""


class RuntimeLoader(Protocol):
    """Loads one model file (edgefleet.agent.runtimes.registry.load_runtime; tests pass their own)."""

    def __call__(
        self, *, fmt: int, model_path: Path, model_id: str, n_ctx: int, n_threads: int | None
    ) -> Runtime: ...


def attempt_of(record: InstallRecord, generation: int) -> LoadAttempt:
    """The load of ``record`` for ``generation``, as the crash-loop breaker counts it."""
    return LoadAttempt(
        bundle=record.bundle,
        version=record.version,
        artifact_sha256=record.artifact_sha256,
        generation=generation,
    )


@dataclass
class Steps:
    """The install, test and activate steps over one device's store, models and lifecycle."""

    lifecycle: Lifecycle
    store: ArtifactStore
    models: ModelTable
    budget: MemoryBudget
    loader: RuntimeLoader
    artifact_budget_bytes: int | None
    loaded_with: dict[str, LoadSettings] = field(default_factory=dict)
    """Per model name, what the runtime serving it was loaded with."""

    async def load_and_test(self, record: InstallRecord, path: Path, settings: EffectiveSettings) -> Runtime:
        """Loads through the memory budget, smoke-tests, and wraps the runtime so its keep-alive
        can change later (a device config may set one where the command line set none)."""
        if record.model_format in FOLDER_FORMATS:
            assert self.store.unpacked_dir is not None, "folder variants need an unpacked_dir"
            with typed_os_errors():
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
        with typed_os_errors():
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

    async def load_installed(self, record: InstallRecord, settings: EffectiveSettings) -> Runtime:
        # The artifact was hashed against signed metadata before it entered the read-only
        # store; at boot its size is re-checked, not its hash, so a large model starts fast.
        with typed_os_errors():
            path = self.store.installed(record.artifact_sha256, record.length, what=record.model_id)
        return await self.load_and_test(record, path, settings)

    async def install(
        self,
        verified: rel.VerifiedRelease,
        selection: Selection,
        generation: int,
        stub: device_pb2_grpc.DeviceServiceStub,
        settings: EffectiveSettings,
    ) -> None:
        """Fetches, loads and smoke-tests ``selection`` of ``verified``, then swaps it in."""
        variant = selection.variant
        info = verified.artifacts[variant.artifact]
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
        attempt = attempt_of(record, generation)
        lifecycle = self.lifecycle
        # The guard refuses a load that crashed the agent too often before anything downloads.
        path = await self.fetch(
            stub, info, generation=generation, detail=f"{verified.name}: {selection.reason}", attempt=attempt
        )

        # The marker is persisted before the load: a process that dies inside it leaves it
        # behind, and the next one counts the crash (AgentState.after_restart).
        lifecycle.fire(
            Event.LOAD_STARTED,
            generation=generation,
            detail=f"loading {record.model_id} ({variant.id})",
            attempt=attempt,
        )
        try:
            runtime = await self.load_and_test(record, path, settings)
        except BaseException as exc:
            ended = lifecycle.state.load_ended(loaded=False)
            if isinstance(exc, TransientFailure):
                # No refusal will persist it, and a restart before the retry is no crash.
                lifecycle.save_best_effort(ended, why=f"the load of {record.model_id} ended")
            lifecycle.hold(ended)  # a refusal persists it
            raise
        lifecycle.hold(lifecycle.state.load_ended(loaded=True))  # persisted with the next move

        old = self.models.put(runtime)
        self.loaded_with[record.bundle] = settings.load
        try:
            lifecycle.fire(
                Event.SWAPPED_IN,
                lifecycle.state.installing(record),
                generation=generation,
                detail=f"serving {record.model_id} ({variant.id})",
            )
        finally:
            if old is not None and old is not runtime:
                await self.retire(old)  # in-flight requests on the old release finish first

    async def fetch(
        self,
        stub: device_pb2_grpc.DeviceServiceStub,
        info: rel.ArtifactInfo,
        *,
        generation: int,
        detail: str,
        attempt: LoadAttempt,
    ) -> Path:
        """Downloads and verifies one artifact of an install, its lifecycle steps around it."""
        lifecycle = self.lifecycle
        lifecycle.fire(
            Event.FETCH_STARTED,
            replace(lifecycle.state, desired_generation=generation),
            generation=generation,
            detail=detail,
            attempt=attempt,
        )
        with typed_os_errors():
            path = await self.store.fetch(stub, info)
        lifecycle.fire(Event.FETCHED, generation=generation)
        return path

    async def reload(
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
        self.lifecycle.fire(
            Event.RELOAD_STARTED,
            generation=generation,
            detail=f"loading {names} again with {settings.load.describe()}",
        )
        loaded: list[tuple[InstallRecord, Runtime]] = []
        for record in records:
            try:
                path = self.store.path(record.artifact_sha256)
                loaded.append((record, await self.load_and_test(record, path, settings)))
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
            self.loaded_with[record.bundle] = settings.load
            self.lifecycle.hold(self.lifecycle.state.updated(record))
        for old in retired:
            if old is not None:  # in-flight requests on the old runtime finish first
                await self.retire(old)

    async def remove(self, name: str, generation: int) -> None:
        """The model is no longer assigned: stop serving it (after its requests finish) and
        forget it, rollback copy included; its files go with the next garbage collection."""
        old = self.models.remove(name)
        self.loaded_with.pop(name, None)
        self.lifecycle.fire(
            Event.REMOVED, self.lifecycle.state.without(name), generation=generation, detail=f"removed {name}"
        )
        if old is not None:
            await self.retire(old)

    async def retire(self, runtime: Runtime) -> None:
        await asyncio.to_thread(self.models.retire, runtime, timeout=RETIRE_TIMEOUT_SECONDS)

    def collect_garbage(self, *, keep_partial: bool) -> None:
        """Deletes artifacts no install record needs; rollback copies over the disk budget
        are forgotten first."""
        state = self.lifecycle.state
        kept = retained(state, budget_bytes=self.artifact_budget_bytes)
        if len(kept) < len(state.models) + len(state.previous):
            try:
                self.lifecycle.record(state.without_previous(kept))
            except StateNotSaved as exc:
                # The file still names the rollback copies: their artifacts must stay.
                log.error("%s; no artifact is collected until the state can be written", exc)
                return
        with typed_os_errors():
            removed = self.store.collect_garbage({r.artifact_sha256 for r in kept}, keep_partial=keep_partial)
        if removed:
            log.info("removed unused artifacts: %s", ", ".join(removed))
