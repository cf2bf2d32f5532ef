"""LoRA adapter releases on the device: installed only over the base release they name, loaded
onto the base's serving runtime without loading the base again, served as ``<base>:<adapter>``.

An adapter release (``VerifiedRelease.adapter_base`` set, see ``edgefleet.protos.fleet.release``)
names its base by bundle name, version and the base artifact's sha256, all signed. The device
installs it only when it holds that base, installed or installed earlier in the same generation;
otherwise the adapter is refused naming the base (the operator deploys the base too). Its
artifact is fetched and verified like any other; loading it is ``load_lora`` on the base's
runtime, off the event loop. A failing load refuses the adapter and the base keeps serving as it
did. A base that an assigned adapter still needs is neither replaced by another release nor
removed: that is refused with the adapter's name, and the adapter keeps serving.

The adapter's install record (``InstallRecord.adapter_of``) puts it in the persisted state like
a model, so its artifact is kept, it loads again at boot over its base, and undeploying it
unloads it from the base.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from edgefleet.agent.runtimes.lora import LoraRuntime, UnknownLora
from edgefleet.agent.runtimes.model_table import ModelTable
from edgefleet.agent.update.errors import AgentError, Refusal, TransientFailure, typed_os_errors
from edgefleet.agent.update.lifecycle import Event
from edgefleet.agent.update.selection import Selection
from edgefleet.agent.update.state import AgentState, InstallRecord
from edgefleet.protos.fleet import release as rel
from edgefleet.protos.fleet.v1 import device_pb2_grpc

if TYPE_CHECKING:
    from edgefleet.agent.update.planning import Plan
    from edgefleet.agent.update.steps import Steps

log = logging.getLogger(__name__)


class AdapterBaseMissing(AgentError, Refusal):
    """An adapter release names a base release this device does not hold (another version,
    other weights, or none): the operator must deploy that base too."""

    def __init__(self, adapter: str, base: str) -> None:
        self.adapter = adapter
        self.base = base
        super().__init__(
            f"LoRA adapter {adapter} needs its base release {base}, which this device does not hold"
        )


class AdapterBaseNeeded(AgentError, Refusal):
    """A base release would be replaced or removed while an adapter assigned to this device
    still needs it; the base keeps serving (undeploy or update the adapter first)."""

    def __init__(self, base: str, adapters: Iterable[str]) -> None:
        self.base = base
        self.adapters = tuple(sorted(adapters))
        super().__init__(
            f"{base} is the base of the LoRA adapter(s) {', '.join(self.adapters)}: "
            "it is not replaced or removed while they are deployed"
        )


class AdapterHostUnavailable(AgentError, Refusal):
    """The base's runtime is not loaded, or cannot load LoRA adapters (not llama.cpp)."""


def base_ref(base: object) -> str:
    return f"{getattr(base, 'name', '')}@{getattr(base, 'version', 0)}"


def holds_base(state: AgentState, release: rel.VerifiedRelease) -> bool:
    """Whether ``state`` has installed the base ``release`` names, with that artifact."""
    base = release.adapter_base
    record = state.model(base.name) if base is not None else None
    return (
        base is not None
        and record is not None
        and not record.adapter_of
        and (record.version, record.artifact_sha256) == (base.version, base.artifact_sha256)
    )


def check_plan(todo: Plan, assigned: Iterable[rel.VerifiedRelease], state: AgentState) -> None:
    """Moves to ``todo.refused`` every adapter install whose base the device will not hold and
    every base install that would take the weights from under an assigned adapter; orders the
    remaining installs bases first, so an adapter deployed with its base loads over it."""
    adapters = [r for r in assigned if r.adapter_base is not None]
    installs = {r.name: r.artifacts[s.variant.artifact].sha256 for r, s in todo.install}
    kept: list[tuple[rel.VerifiedRelease, Selection]] = []
    for release, selection in todo.install:
        if release.adapter_base is None:
            needing = [
                a.name
                for a in adapters
                if a.adapter_base is not None
                and a.adapter_base.name == release.name
                and (a.adapter_base.version, a.adapter_base.artifact_sha256)
                != (release.version, installs[release.name])
            ]
            held = state.model(release.name)
            if needing and held is not None:
                todo.refused.append((release.name, AdapterBaseNeeded(held.model_id, needing)))
                continue
        kept.append((release, selection))
    ready: list[tuple[rel.VerifiedRelease, Selection]] = []
    for release, selection in kept:
        base = release.adapter_base
        if base is None:
            ready.append((release, selection))
            continue
        will_hold = installs.get(base.name) == base.artifact_sha256 and any(
            r.name == base.name and r.version == base.version for r, _ in kept
        )
        if not (will_hold or holds_base(state, release)):
            todo.refused.append((release.name, AdapterBaseMissing(release.name, base_ref(base))))
            continue
        ready.append((release, selection))
    todo.install = sorted(ready, key=lambda item: item[0].adapter_base is not None)


def needed_bases(assigned: Iterable[rel.VerifiedRelease]) -> dict[str, list[str]]:
    """Per base bundle name, the assigned adapters loaded over it."""
    needed: dict[str, list[str]] = {}
    for release in assigned:
        if release.adapter_base is not None:
            needed.setdefault(release.adapter_base.name, []).append(release.name)
    return needed


def lora_host(models: ModelTable, base: str) -> LoraRuntime:
    runtime = models.get(base)
    if runtime is None:
        raise AdapterHostUnavailable(f"the base model {base} is not loaded")
    if not isinstance(runtime, LoraRuntime):
        raise AdapterHostUnavailable(f"the runtime serving {base} cannot load LoRA adapters")
    return runtime


def is_loaded(models: ModelTable, record: InstallRecord) -> bool:
    """Whether the adapter of ``record`` is loaded over its base now."""
    runtime = models.get(record.adapter_of)
    return isinstance(runtime, LoraRuntime) and any(i.name == record.bundle for i in runtime.loras())


async def install(
    steps: Steps,
    verified: rel.VerifiedRelease,
    selection: Selection,
    generation: int,
    stub: device_pb2_grpc.DeviceServiceStub,
) -> None:
    """Fetches and verifies the adapter, then loads it over its base (which keeps serving)."""
    from edgefleet.agent.update.steps import attempt_of  # steps imports this module

    base = verified.adapter_base
    assert base is not None, "only adapter releases install here"
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
        memory_bytes=info.length,
        adapter_of=base.name,
        base_sha256=base.artifact_sha256,
    )
    attempt = attempt_of(record, generation)
    lifecycle = steps.lifecycle
    path = await steps.fetch(
        stub,
        info,
        generation=generation,
        detail=f"{verified.name}: LoRA adapter over {base_ref(base)}",
        attempt=attempt,
    )
    lifecycle.fire(
        Event.LOAD_STARTED,
        generation=generation,
        detail=f"loading LoRA adapter {record.model_id} over {base.name}",
        attempt=attempt,
    )
    try:
        await _load(steps, record, path)
    except BaseException as exc:
        ended = lifecycle.state.load_ended(loaded=False)
        if isinstance(exc, TransientFailure):
            lifecycle.save_best_effort(ended, why=f"the load of {record.model_id} ended")
        lifecycle.hold(ended)
        raise
    lifecycle.hold(lifecycle.state.load_ended(loaded=True))
    lifecycle.fire(
        Event.SWAPPED_IN,
        lifecycle.state.installing(record),
        generation=generation,
        detail=f"serving {base.name}:{verified.name} ({record.model_id})",
    )


async def _load(steps: Steps, record: InstallRecord, path: Path) -> None:
    """Loads ``record``'s adapter over its base; an earlier release of the same adapter gives way
    first and comes back when the new one fails to load."""
    host = lora_host(steps.models, record.adapter_of)
    current = steps.lifecycle.state.model(record.bundle)
    replaced = current is not None and is_loaded(steps.models, current)
    if replaced:
        await asyncio.to_thread(host.unload_lora, record.bundle)
    try:
        await asyncio.to_thread(host.load_lora, record.bundle, path)
    except BaseException:
        if replaced and current is not None:
            await _load_best_effort(steps, current)
        raise


async def _load_best_effort(steps: Steps, record: InstallRecord) -> bool:
    try:
        host = lora_host(steps.models, record.adapter_of)
        with typed_os_errors():
            path = steps.store.installed(record.artifact_sha256, record.length, what=record.model_id)
        await asyncio.to_thread(host.load_lora, record.bundle, path)
    except (Refusal, TransientFailure) as exc:
        log.error("LoRA adapter %s is not loaded: %s: %s", record.model_id, type(exc).__name__, exc)
        return False
    return True


async def reattach(steps: Steps, state: AgentState, bases: Iterable[str]) -> None:
    """Loads the installed adapters over ``bases`` again (after their runtimes were loaded anew:
    at boot, or a reload with new load settings); an adapter whose base now has other weights
    (rolled back) is not loaded, and says so."""
    names = set(bases)
    for record in state.models:
        if not record.adapter_of or record.adapter_of not in names:
            continue
        base = state.model(record.adapter_of)
        if base is None or base.artifact_sha256 != record.base_sha256:
            log.error(
                "LoRA adapter %s is not loaded: its base %s is not installed",
                record.model_id,
                record.adapter_of,
            )
            continue
        if await _load_best_effort(steps, record):
            log.info("LoRA adapter %s loaded over %s", record.model_id, record.adapter_of)


async def unload(models: ModelTable, record: InstallRecord) -> None:
    """Stops serving the adapter of ``record``; gone already (its base unloaded) is fine."""
    runtime = models.get(record.adapter_of)
    if not isinstance(runtime, LoraRuntime):
        return
    with contextlib.suppress(UnknownLora):
        await asyncio.to_thread(runtime.unload_lora, record.bundle)
