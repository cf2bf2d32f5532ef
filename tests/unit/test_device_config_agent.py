"""The agent applying a signed device config: live settings, reloads on a new context length,
refusals that change nothing, the config in force across restarts, and the live parts
(admission limits, keep-alive, telemetry interval) on their own."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from edgefleet.agent.api.admission import AdmissionQueue, QueueFull, QueueLimits
from edgefleet.agent.config import AgentConfig, EffectiveSettings, effective_settings
from edgefleet.agent.device.hardware_profile import HardwareProfile
from edgefleet.agent.runtimes.base import Runtime, RuntimeLoadError, SamplingParams
from edgefleet.agent.runtimes.keep_alive import KeepAliveRuntime
from edgefleet.agent.runtimes.model_table import ModelTable
from edgefleet.agent.service import AgentService
from edgefleet.agent.telemetry.outbox import Outbox
from edgefleet.agent.telemetry.recorder import FlushSchedule, Telemetry
from edgefleet.agent.update.artifacts import ArtifactStore
from edgefleet.agent.update.selection import Pin
from edgefleet.agent.update.state import AgentState, load_state, save_state
from edgefleet.agent.update.updater import Updater, signed_config, signed_pin
from edgefleet.agent.update.uptane_client import Assignment
from edgefleet.protos.fleet import release as rel
from edgefleet.protos.fleet.v1 import bundle_pb2, common_pb2, device_pb2
from tests.unit.test_api import FakeRuntime
from tests.unit.test_telemetry_recorder import request

Config = common_pb2.DeviceConfig
GGUF = common_pb2.MODEL_FORMAT_GGUF
CLI_N_CTX = 512
S = common_pb2


# -- a device with fake runtimes ----------------------------------------------------------------


def gguf_release(name: str, version: int, quantizations: tuple[str, ...] = ("Q4_0",)) -> rel.VerifiedRelease:
    """A release with one GGUF variant per quantization (its bytes: name, version and quant)."""
    variants, artifacts = [], {}
    for quant in quantizations:
        payload = f"{name}-{version}-{quant}".encode() * 50
        artifact = f"{name}/{version}/model.{quant.lower()}.gguf"
        artifacts[artifact] = rel.ArtifactInfo(artifact, len(payload), hashlib.sha256(payload).hexdigest())
        variants.append(
            bundle_pb2.Variant(
                id=f"gguf-{quant.lower()}",
                format=GGUF,
                quantization=quant,
                artifact=artifact,
                size_bytes=len(payload),
            )
        )
    manifest = bundle_pb2.BundleManifest(schema_version=1, name=name, version=version, variants=variants)
    return rel.VerifiedRelease(name, version, datetime.now(UTC), manifest, artifacts, b"")


def payloads(*releases: rel.VerifiedRelease) -> dict[str, bytes]:
    found = {}
    for release in releases:
        for variant in release.manifest.variants:
            quant = variant.quantization
            payload = f"{release.name}-{release.version}-{quant}".encode() * 50
            found[hashlib.sha256(payload).hexdigest()] = payload
    return found


class ArtifactServer:
    """DeviceService.FetchArtifact over the given payloads, by sha256."""

    def __init__(self, by_sha: dict[str, bytes]) -> None:
        self.by_sha = by_sha
        self.fetched: list[str] = []

    def FetchArtifact(self, request: Any, metadata: object = None) -> AsyncIterator[device_pb2.ArtifactChunk]:
        payload = self.by_sha[request.sha256]
        self.fetched.append(request.sha256)

        async def chunks() -> AsyncIterator[device_pb2.ArtifactChunk]:
            yield device_pb2.ArtifactChunk(offset=request.offset, data=payload[request.offset :])

        return chunks()


@dataclass
class Loader:
    """Loads fake runtimes, recording each load; refuses the (model, n_ctx) pairs in ``fail``."""

    events: list[tuple[str, object]]
    fail: set[tuple[str, int]] = field(default_factory=set)
    made: list[FakeRuntime] = field(default_factory=list)

    def __call__(
        self, *, fmt: int, model_path: Path, model_id: str, n_ctx: int, n_threads: int | None
    ) -> Runtime:
        self.events.append(("load", (model_id, n_ctx, n_threads)))
        if (model_id, n_ctx) in self.fail:
            raise RuntimeLoadError(f"cannot allocate a context of {n_ctx} tokens")
        self.made.append(FakeRuntime(model_id=model_id, n_ctx=n_ctx))
        return self.made[-1]

    def loads(self) -> list[object]:
        return [what for kind, what in self.events if kind == "load"]


@dataclass
class Director:
    """What UptaneVerifier.refresh would return: the assignment as verified (tests sign nothing)."""

    assignment: Assignment

    def refresh(self) -> Assignment:
        return self.assignment


@dataclass
class Device:
    config: AgentConfig
    updater: Updater
    loader: Loader
    events: list[tuple[str, object]]
    server: ArtifactServer
    transitions: list[tuple[int, int, str]]

    async def deploy(
        self,
        generation: int,
        *releases: rel.VerifiedRelease,
        config: common_pb2.DeviceConfig | None = None,
        pin: common_pb2.VariantPin | None = None,
    ) -> None:
        assignment = Assignment(generation=generation, releases=releases, pin=pin, config=config)
        await self.updater.apply(
            device_pb2.DesiredState(generation=generation),
            Director(assignment),  # type: ignore[arg-type]
            self.server,  # type: ignore[arg-type]
        )

    @property
    def state(self) -> AgentState:
        return self.updater.state

    def runtime(self, name: str) -> KeepAliveRuntime:
        runtime = self.updater.models.get(name)
        assert isinstance(runtime, KeepAliveRuntime)
        return runtime

    def settings_applied(self) -> list[EffectiveSettings]:
        return [what for kind, what in self.events if kind == "settings"]  # type: ignore[misc]

    def restarted(self) -> Device:
        """The same state dir, a new process: state read from disk, nothing loaded."""
        return make_device(self.config, self.server, fail=self.loader.fail)


def make_device(
    config: AgentConfig, server: ArtifactServer, *, fail: set[tuple[str, int]] | None = None
) -> Device:
    events: list[tuple[str, object]] = []
    transitions: list[tuple[int, int, str]] = []
    loader = Loader(events, fail=fail if fail is not None else set())
    updater = Updater(
        config=config,
        store=ArtifactStore(config.artifact_dir, config.download_dir, config.unpacked_dir),
        models=ModelTable(),
        state=load_state(config.state_path),
        on_transition=lambda state, generation, detail: transitions.append((state.phase, generation, detail)),
        available_ram=lambda: None,
        hardware=HardwareProfile(),
        on_settings=lambda settings: events.append(("settings", settings)),
        loader=loader,
    )
    return Device(config, updater, loader, events, server, transitions)


TINY = gguf_release("tiny", 1)
EMBED = gguf_release("embed", 1)
PINNABLE = gguf_release("pinnable", 1, ("Q4_0", "Q8_0"))


@pytest.fixture
def device(tmp_path: Path) -> Device:
    config = AgentConfig(
        controlplane="127.0.0.1:1",
        state_dir=tmp_path,
        trust_path=tmp_path / "trust.json",
        n_ctx=CLI_N_CTX,
        max_running_requests=1,
        max_waiting_requests=16,
        telemetry_interval_seconds=15.0,
        keep_alive_seconds=None,
    )
    return make_device(config, ArtifactServer(payloads(TINY, EMBED, PINNABLE)))


def assert_applied(device: Device, generation: int) -> None:
    state = device.state
    assert (state.phase, state.applied_generation, state.last_error) == (
        S.DEVICE_STATE_ACTIVE,
        generation,
        "",
    )
    assert load_state(device.config.state_path) == state  # persisted as it is


# -- applying a config ---------------------------------------------------------------------------


async def test_live_settings_apply_without_loading_anything_again(device: Device) -> None:
    await device.deploy(1, TINY)
    assert device.loader.loads() == [("tiny", CLI_N_CTX, None)]
    served = device.runtime("tiny")
    assert served.keep_alive_s is None

    config = Config(max_running=3, max_waiting=0, telemetry_interval_seconds=5, keep_alive_seconds=60)
    await device.deploy(2, TINY, config=config)
    assert_applied(device, 2)
    assert device.loader.loads() == [("tiny", CLI_N_CTX, None)]  # nothing reloaded
    assert device.runtime("tiny") is served and served.keep_alive_s == 60.0
    assert device.settings_applied()[-1] == EffectiveSettings(
        n_ctx=CLI_N_CTX,
        n_threads=None,
        max_running_requests=3,
        max_waiting_requests=0,
        telemetry_interval_seconds=5.0,
        keep_alive_seconds=60.0,
    )
    assert device.state.config_in_force() == config
    assert any("device config in force: max_running=3" in detail for _, _, detail in device.transitions)


async def test_a_new_context_length_loads_every_model_again_then_swaps(device: Device) -> None:
    await device.deploy(1, EMBED, TINY)
    old = {name: device.runtime(name) for name in ("embed", "tiny")}
    inner = list(device.loader.made)
    records = {r.bundle: r for r in device.state.models}

    await device.deploy(2, EMBED, TINY, config=Config(n_ctx=1024, n_threads=2))
    assert_applied(device, 2)
    assert device.loader.loads()[2:] == [("embed", 1024, 2), ("tiny", 1024, 2)]
    for name in ("embed", "tiny"):
        assert device.runtime(name) is not old[name]
        assert device.runtime(name).describe().n_ctx == 1024  # what /v1/models reports
        assert device.runtime(name).complete("hi there", SamplingParams(max_tokens=2)).text
    assert all(runtime.unloaded for runtime in inner)  # the old runtimes were retired
    for record in device.state.models:
        before = records[record.bundle]
        assert (record.artifact_sha256, record.generation) == (before.artifact_sha256, 2)
        assert record.memory_bytes >= before.memory_bytes  # a larger KV cache is counted
    assert device.state.previous == ()  # a reload is no release change: no rollback copy of itself
    assert device.server.fetched.count(records["tiny"].artifact_sha256) == 1  # nothing fetched again


async def test_a_reload_failure_keeps_every_old_runtime_and_refuses_the_generation(device: Device) -> None:
    await device.deploy(1, EMBED, TINY, config=Config(max_running=2))
    old = {name: device.runtime(name) for name in ("embed", "tiny")}
    settings = device.updater.settings
    device.loader.fail.add(("tiny", 4096))  # "embed" loads again first, then "tiny" fails

    await device.deploy(2, EMBED, TINY, config=Config(n_ctx=4096, max_running=4))
    state = device.state
    assert state.phase == S.DEVICE_STATE_FAILED and state.applied_generation == 1
    assert state.last_error_kind == "UnusableConfig"
    assert "tiny@1 cannot run with n_ctx=4096, n_threads=auto: RuntimeLoadError" in state.last_error
    assert {name: device.runtime(name) for name in ("embed", "tiny")} == old  # still serving
    assert all(r.loaded for r in old.values())
    new_embed = device.loader.made[-1]
    assert new_embed.describe().n_ctx == 4096 and new_embed.unloaded  # loaded, then let go
    assert device.updater.settings == settings and device.settings_applied()[-1] == settings
    assert state.config_in_force() == Config(max_running=2)  # the old config stays in force
    assert load_state(device.config.state_path).config_in_force() == Config(max_running=2)

    await device.deploy(3, EMBED, TINY, config=Config(n_ctx=2048, max_running=4))
    assert_applied(device, 3)
    assert device.runtime("tiny").describe().n_ctx == 2048


async def test_a_config_the_agent_cannot_use_is_refused_and_changes_nothing(device: Device) -> None:
    """A compromised director signs what the control plane would have refused."""
    await device.deploy(1, TINY)
    before = (device.runtime("tiny"), device.updater.settings, len(device.settings_applied()))
    for generation, bad, reason in [
        (2, Config(n_ctx=64, max_running=8), "n_ctx: must be 128..1048576, got 64"),
        (3, Config(keep_alive_seconds=-5), "keep_alive_seconds: must be 0 (never unload) or 1..604800"),
        (4, Config(pin=common_pb2.VariantPin(variant_id="gguf-q4_0", format=GGUF)), "exactly one"),
    ]:
        await device.deploy(generation, TINY, config=bad)
        state = device.state
        assert (state.phase, state.applied_generation) == (S.DEVICE_STATE_FAILED, 1)
        assert state.last_error_kind == "UnusableConfig"
        assert state.last_error.startswith("device config refused: ") and reason in state.last_error
        assert (device.runtime("tiny"), device.updater.settings, len(device.settings_applied())) == before
        assert state.config_in_force() is None
    assert device.loader.loads() == [("tiny", CLI_N_CTX, None)]


async def test_a_context_no_variant_fits_is_the_configs_fault(device: Device) -> None:
    """The model serves under the current n_ctx; none of its variants fits the new one."""
    # The fake variants are ~550 bytes: their KV estimate is ~16 bytes a token, 16 MiB at 1M tokens.
    small = HardwareProfile(ram_total_bytes=4 * 2**20, ram_available_bytes=4 * 2**20)
    device.updater._hardware = small
    await device.deploy(1, TINY)
    await device.deploy(2, TINY, config=Config(n_ctx=1_048_576))
    state = device.state
    assert (state.phase, state.last_error_kind) == (S.DEVICE_STATE_FAILED, "UnusableConfig")
    assert "tiny@1 cannot run with n_ctx=1048576" in state.last_error
    assert device.updater.settings.n_ctx == CLI_N_CTX and state.config_in_force() is None


async def test_removing_the_config_returns_to_the_command_line(device: Device) -> None:
    await device.deploy(1, TINY, config=Config(n_ctx=1024, keep_alive_seconds=30))
    assert device.runtime("tiny").keep_alive_s == 30.0
    await device.deploy(2, TINY)
    assert_applied(device, 2)
    assert device.loader.loads() == [("tiny", 1024, None), ("tiny", CLI_N_CTX, None)]
    assert device.runtime("tiny").describe().n_ctx == CLI_N_CTX
    assert device.runtime("tiny").keep_alive_s is None
    assert device.state.config_in_force() is None and device.state.device_config == {}


async def test_the_same_config_again_changes_nothing(device: Device) -> None:
    config = Config(n_ctx=1024)
    await device.deploy(1, TINY, config=config)
    settings_calls, transitions = len(device.settings_applied()), len(device.transitions)
    await device.deploy(2, TINY, config=config)
    assert_applied(device, 2)
    assert device.loader.loads() == [("tiny", 1024, None)]
    assert len(device.settings_applied()) == settings_calls
    assert len(device.transitions) == transitions + 2  # verifying, then applied: no config step


async def test_a_new_release_loads_with_the_config_of_its_generation(device: Device) -> None:
    await device.deploy(1, TINY, config=Config(n_ctx=1024, n_threads=3))
    assert device.loader.loads() == [("tiny", 1024, 3)]
    assert device.runtime("tiny").describe().n_ctx == 1024


# -- the pin ------------------------------------------------------------------------------------


async def test_the_config_pin_chooses_the_variant_when_the_director_signs_no_pin(device: Device) -> None:
    await device.deploy(1, PINNABLE)
    assert device.state.model("pinnable").variant == "gguf-q8_0"  # type: ignore[union-attr]  # more bits
    await device.deploy(2, PINNABLE, config=Config(pin=common_pb2.VariantPin(variant_id="gguf-q4_0")))
    assert_applied(device, 2)
    assert device.state.model("pinnable").variant == "gguf-q4_0"  # type: ignore[union-attr]
    assert (
        device.updater.selection is not None
        and "pinned to variant gguf-q4_0" in device.updater.selection.reason
    )


async def test_the_director_pin_wins_over_the_config_pin(
    device: Device, caplog: pytest.LogCaptureFixture
) -> None:
    director = common_pb2.VariantPin(variant_id="gguf-q8_0", scope="device")
    config = Config(pin=common_pb2.VariantPin(format=GGUF))
    assignment = Assignment(generation=1, releases=(PINNABLE,), pin=director, config=config)
    with caplog.at_level(logging.WARNING, logger="edgefleet.agent.update.updater"):
        assert signed_pin(assignment) == Pin(variant_id="gguf-q8_0", scope="device")
    assert (
        "director's pin (pinned to variant gguf-q8_0 (device)) wins over the device config's" in caplog.text
    )
    assert signed_pin(Assignment(generation=1, releases=(), config=config)) == Pin(format=GGUF)
    assert signed_pin(Assignment(generation=1, releases=(), config=Config(n_ctx=1024))) is None

    q4 = Config(pin=common_pb2.VariantPin(variant_id="gguf-q4_0"))
    await device.deploy(1, PINNABLE, config=q4, pin=director)
    assert_applied(device, 1)
    assert device.state.model("pinnable").variant == "gguf-q8_0"  # type: ignore[union-attr]
    assert any("its pin is overridden by the director's pin" in detail for _, _, detail in device.transitions)


async def test_a_config_pin_no_release_has_is_refused(device: Device) -> None:
    await device.deploy(1, TINY)
    await device.deploy(2, TINY, config=Config(pin=common_pb2.VariantPin(variant_id="gguf-q8_0")))
    state = device.state
    assert (state.phase, state.last_error_kind) == (S.DEVICE_STATE_FAILED, "PinNotHonoured")
    assert state.config_in_force() is None


def test_signed_config_ignores_an_empty_config() -> None:
    assert signed_config(Assignment(generation=1, releases=(), config=Config())) is None
    assert signed_config(Assignment(generation=1, releases=())) is None


# -- across restarts ----------------------------------------------------------------------------


async def test_the_config_in_force_applies_at_boot_before_any_model_loads(device: Device) -> None:
    config = Config(n_ctx=1024, max_running=3, keep_alive_seconds=45)
    await device.deploy(1, EMBED, TINY, config=config)
    rebooted = device.restarted()
    await rebooted.updater.restore()
    first, *_ = rebooted.events
    assert first[0] == "settings" and first[1].max_running_requests == 3  # type: ignore[attr-defined]
    assert rebooted.loader.loads() == [("embed", 1024, None), ("tiny", 1024, None)]
    assert rebooted.runtime("tiny").keep_alive_s == 45.0
    assert rebooted.state.phase == S.DEVICE_STATE_ACTIVE

    # What boot loaded counts as loaded with the config: the same config again reloads nothing.
    await rebooted.deploy(2, EMBED, TINY, config=config)
    assert_applied(rebooted, 2)
    assert len(rebooted.loader.loads()) == 2


async def test_boot_drops_a_persisted_config_this_build_cannot_use(device: Device) -> None:
    await device.deploy(1, TINY, config=Config(n_ctx=1024))
    state = load_state(device.config.state_path)
    save_state(device.config.state_path, AgentState(**{**state_fields(state), "device_config": {"nCtx": 64}}))
    rebooted = device.restarted()
    await rebooted.updater.restore()
    assert rebooted.loader.loads() == [("tiny", CLI_N_CTX, None)]
    assert rebooted.state.device_config == {}
    assert load_state(device.config.state_path).device_config == {}
    assert rebooted.settings_applied()[0].n_ctx == CLI_N_CTX


def state_fields(state: AgentState) -> dict[str, Any]:
    return {name: getattr(state, name) for name in AgentState.__dataclass_fields__}


# -- admission limits, live ---------------------------------------------------------------------


async def settle(condition: Callable[[], bool]) -> None:
    async with asyncio.timeout(5):
        while not condition():  # noqa: ASYNC110
            await asyncio.sleep(0.005)


async def test_raising_max_running_admits_waiters_at_once() -> None:
    queue = AdmissionQueue(QueueLimits(max_running=1, max_waiting=4))
    running = await queue.admit()
    waiters = [asyncio.create_task(queue.admit()) for _ in range(3)]
    await settle(lambda: queue.waiting == 3)
    queue.set_limits(QueueLimits(max_running=3, max_waiting=4))
    await settle(lambda: sum(w.done() for w in waiters) == 2)
    assert (queue.running, queue.waiting) == (3, 1)
    running.release()  # passes straight on to the last waiter
    slots = await asyncio.gather(*waiters)
    assert (queue.running, queue.waiting) == (3, 0)
    for slot in slots:
        slot.release()
    assert queue.running == 0


async def test_lowering_max_running_lets_running_requests_finish_and_drops_no_waiter() -> None:
    queue = AdmissionQueue(QueueLimits(max_running=3, max_waiting=4))
    slots = [await queue.admit() for _ in range(3)]
    waiter = asyncio.create_task(queue.admit())
    await settle(lambda: queue.waiting == 1)
    queue.set_limits(QueueLimits(max_running=1, max_waiting=4))
    assert (queue.running, queue.waiting) == (3, 1)
    slots[0].release()  # 3 > 1: the slot goes away instead of passing on
    slots[1].release()
    assert (queue.running, queue.waiting, waiter.done()) == (1, 1, False)
    slots[2].release()  # now under the new limit: the waiter gets it
    (await waiter).release()
    assert (queue.running, queue.waiting) == (0, 0)


async def test_lowering_max_waiting_keeps_the_queued_and_turns_newcomers_away() -> None:
    queue = AdmissionQueue(QueueLimits(max_running=1, max_waiting=3))
    slot = await queue.admit()
    waiters = [asyncio.create_task(queue.admit()) for _ in range(3)]
    await settle(lambda: queue.waiting == 3)
    queue.set_limits(QueueLimits(max_running=1, max_waiting=0))
    with pytest.raises(QueueFull):
        await queue.admit()
    assert queue.waiting == 3  # nobody already waiting was dropped
    slot.release()
    for waiter in waiters:
        (await waiter).release()
    assert (queue.running, queue.waiting, queue.rejected) == (0, 0, 1)


# -- keep-alive, live ---------------------------------------------------------------------------


def until(condition: Callable[[], bool], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def test_a_keep_alive_set_later_unloads_an_idle_model_and_can_be_lifted_again() -> None:
    first = FakeRuntime()
    runtime = KeepAliveRuntime(first, reload=FakeRuntime, keep_alive_s=None)
    try:
        assert runtime.keep_alive_s is None
        time.sleep(0.3)
        assert runtime.loaded  # never, as configured
        runtime.keep_alive_s = 0.2
        assert until(lambda: not runtime.loaded) and first.unloaded
        assert runtime.complete("hello", SamplingParams(max_tokens=2)).text  # loads again
        runtime.keep_alive_s = None
        time.sleep(0.5)
        assert runtime.loaded  # lifted: stays
        runtime.keep_alive_s = 0.2
        runtime.keep_alive_s = 0.25  # no second reaper: one thread reads the newest value
        assert until(lambda: not runtime.loaded)
        assert sum(t.name == "edgefleet-keep-alive" for t in threading.enumerate()) >= 1
        with pytest.raises(ValueError, match="positive"):
            runtime.keep_alive_s = 0
    finally:
        runtime.unload()


def test_a_longer_keep_alive_keeps_a_model_that_the_old_one_would_have_unloaded() -> None:
    runtime = KeepAliveRuntime(FakeRuntime(), reload=FakeRuntime, keep_alive_s=0.2)
    try:
        runtime.keep_alive_s = 60
        time.sleep(0.6)
        assert runtime.loaded
    finally:
        runtime.unload()


# -- telemetry interval, live -------------------------------------------------------------------


class Ticks:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_the_flush_schedule_follows_a_changed_interval_in_the_open_window() -> None:
    clock = Ticks()
    schedule = FlushSchedule(60, clock=clock)
    clock.now += 20
    assert schedule.due_in() == pytest.approx(40)
    schedule.interval_seconds = 10  # shorter than the window has run: due now
    assert schedule.due_in() == pytest.approx(-10)
    schedule.flushed()
    assert schedule.due_in() == pytest.approx(10)
    schedule.interval_seconds = 3600
    assert schedule.due_in() == pytest.approx(3600)
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="positive"):
            schedule.interval_seconds = bad


async def test_the_service_flush_loop_takes_a_new_interval_live(tmp_path: Path) -> None:
    config = AgentConfig(
        controlplane="127.0.0.1:1",
        state_dir=tmp_path,
        trust_path=tmp_path / "trust.json",
        telemetry_interval_seconds=3600,
    )
    service = AgentService(config)
    outbox = Outbox(tmp_path / "outbox.sqlite")
    telemetry = Telemetry(device_id="dev-7", outbox=outbox, aggregator=service.inference)
    service.admission = AdmissionQueue(QueueLimits())
    loop = asyncio.create_task(service._inference_loop(telemetry))
    try:
        telemetry.record_inference(request())
        await asyncio.sleep(0.3)
        assert len(outbox) == 0  # an hour to go
        service._apply_settings(
            EffectiveSettings(
                n_ctx=2048,
                n_threads=None,
                max_running_requests=2,
                max_waiting_requests=5,
                telemetry_interval_seconds=1,
                keep_alive_seconds=None,
            )
        )
        assert service.admission.limits == QueueLimits(max_running=2, max_waiting=5)
        await settle(lambda: len(outbox) == 1)
    finally:
        loop.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await loop
        outbox.close()


def test_healthz_shows_the_config_in_force_and_the_settings_it_results_in(tmp_path: Path) -> None:
    config = AgentConfig(controlplane="127.0.0.1:1", state_dir=tmp_path, trust_path=tmp_path / "trust.json")
    service = AgentService(config)
    device_config = Config(n_ctx=1024, max_waiting=0)
    service.updater = SimpleNamespace(  # type: ignore[assignment]
        state=AgentState().with_config(device_config), settings=effective_settings(config, device_config)
    )
    health = service._health()
    assert health["device_config"] == {"nCtx": 1024, "maxWaiting": 0}
    assert health["settings"] == {
        "n_ctx": 1024,
        "n_threads": None,
        "max_running_requests": 1,
        "max_waiting_requests": 0,
        "telemetry_interval_seconds": 15.0,
        "keep_alive_seconds": None,
        "mirrors": [],
        "max_download_rate": 0,
    }
    service.updater.state = AgentState()  # type: ignore[misc]
    assert service._health()["device_config"] is None


def test_the_mirrors_and_rate_in_force_reach_the_artifact_store(tmp_path: Path) -> None:
    config = AgentConfig(controlplane="127.0.0.1:1", state_dir=tmp_path, trust_path=tmp_path / "trust.json")
    service = AgentService(config)
    store = ArtifactStore(config.artifact_dir, config.download_dir)
    service.updater = SimpleNamespace(store=store)  # type: ignore[assignment]
    device_config = Config(mirrors=["http://a.local/blobs", "https://b.local"], max_download_rate=1 << 20)
    service._apply_settings(effective_settings(config, device_config))
    assert store.mirrors.mirrors == ("http://a.local/blobs", "https://b.local")
    assert store.mirrors.limiter.rate == 1 << 20
    service._apply_settings(effective_settings(config, Config()))  # a config without them: none
    assert store.mirrors.mirrors == () and store.mirrors.limiter.rate == 0
