"""The agent keeps serving through broken local state: a full disk under the state file and the
outbox, a corrupt outbox, crash loops in a release's load, and artifacts of impossible length.
Fakes stand in for the runtime and the disk's refusals (OSError(ENOSPC))."""

from __future__ import annotations

import errno
import hashlib
import sqlite3
from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from edgefleet.agent.config import AgentConfig
from edgefleet.agent.tasks.status import reported_generation
from edgefleet.agent.telemetry.outbox import OutboxError, seq_mark_path
from edgefleet.agent.telemetry.outbox_open import open_outbox
from edgefleet.agent.telemetry.recorder import Telemetry
from edgefleet.agent.update.artifacts import (
    ArtifactStore,
    EmptyArtifact,
    InstalledArtifactDamaged,
    InstalledArtifactMissing,
    SourceLengthMismatch,
)
from edgefleet.agent.update.errors import ControlPlaneUnavailable
from edgefleet.agent.update.state import AgentState, LoadAttempt, StateNotSaved, load_state, save_state
from edgefleet.agent.update.uptane_client import Assignment
from edgefleet.protos.fleet import release as rel
from edgefleet.protos.fleet.topics import TopicKind
from edgefleet.protos.fleet.v1 import common_pb2, device_pb2, telemetry_pb2
from tests.unit.test_device_config_agent import (
    CLI_N_CTX,
    TINY,
    ArtifactServer,
    Device,
    Director,
    gguf_release,
    make_device,
    payloads,
)

S = common_pb2
TINY2 = gguf_release("tiny", 2)


def enospc(*args: object, **kwargs: object) -> None:
    raise OSError(errno.ENOSPC, "No space left on device")


@pytest.fixture
def device(tmp_path: Path) -> Device:
    config = AgentConfig(
        controlplane="127.0.0.1:1",
        state_dir=tmp_path,
        trust_path=tmp_path / "trust.json",
        n_ctx=CLI_N_CTX,
        keep_alive_seconds=None,
    )
    return make_device(config, ArtifactServer(payloads(TINY, TINY2)))


# -- a full disk under the state file ------------------------------------------------------------


def test_save_state_turns_enospc_into_a_typed_error_and_keeps_the_old_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "state.json"
    save_state(path, AgentState(applied_generation=3))
    monkeypatch.setattr("edgefleet.agent.update.state.atomic_write_bytes", enospc)
    with pytest.raises(StateNotSaved) as caught:
        save_state(path, AgentState(applied_generation=4))
    assert caught.value.errno == errno.ENOSPC
    assert load_state(path).applied_generation == 3


async def test_a_full_disk_during_an_update_keeps_the_old_model_serving_and_is_retried(
    device: Device, monkeypatch: pytest.MonkeyPatch
) -> None:
    await device.deploy(1, TINY)
    serving = device.updater.models.get("tiny")
    monkeypatch.setattr("edgefleet.agent.update.state.atomic_write_bytes", enospc)
    with pytest.raises(StateNotSaved):  # transient: the service's apply loop retries it
        await device.deploy(2, TINY2)
    assert device.updater.models.get("tiny") is serving
    assert device.state.model("tiny") is not None and device.state.model("tiny").version == 1  # type: ignore[union-attr]
    assert device.state.phase != S.DEVICE_STATE_FAILED  # not refused: nothing is wrong with it
    assert device.updater.state_writes_failed >= 1
    monkeypatch.undo()
    await device.deploy(2, TINY2)
    assert (device.state.applied_generation, device.state.model("tiny").version) == (2, 2)  # type: ignore[union-attr]


async def test_a_full_disk_at_boot_still_serves_the_installed_model(
    device: Device, monkeypatch: pytest.MonkeyPatch
) -> None:
    await device.deploy(1, TINY)
    restarted = device.restarted()
    monkeypatch.setattr("edgefleet.agent.update.state.atomic_write_bytes", enospc)
    await restarted.updater.restore()
    assert restarted.updater.models.get("tiny") is not None
    assert restarted.state.phase == S.DEVICE_STATE_ACTIVE
    assert restarted.updater.state_writes_failed >= 1


# -- a full disk under the outbox, and a corrupt one ------------------------------------------------


def heartbeat() -> telemetry_pb2.Heartbeat:
    return telemetry_pb2.Heartbeat(state=S.DEVICE_STATE_ACTIVE)


def test_enospc_on_an_outbox_write_is_counted_and_recording_works_again_later(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    outbox = open_outbox(tmp_path / "outbox.sqlite").outbox
    telemetry = Telemetry(device_id="d", outbox=outbox)
    monkeypatch.setattr("edgefleet.agent.telemetry.outbox.atomic_write_bytes", enospc)  # the seq mark
    assert (
        telemetry.record_deployment(generation=1, bundle=None, state=S.DEVICE_STATE_ACTIVE, detail="") is None
    )
    assert telemetry.lost == 1 and len(outbox) == 0
    monkeypatch.undo()
    assert telemetry.record_deployment(generation=1, bundle=None, state=S.DEVICE_STATE_ACTIVE, detail="") == 1
    outbox.close()


def test_an_outbox_the_disk_refuses_to_create_is_an_outbox_error(tmp_path: Path) -> None:
    blocked = tmp_path / "file"
    blocked.write_bytes(b"")
    with pytest.raises(OutboxError):  # the service serves on and tries again later
        open_outbox(blocked / "outbox.sqlite")


def test_a_corrupt_outbox_is_set_aside_and_the_new_one_continues_above_its_seqs(tmp_path: Path) -> None:
    path = tmp_path / "outbox.sqlite"
    first = open_outbox(path).outbox
    for _ in range(3):
        first.put(TopicKind.HEARTBEAT, heartbeat())
    first.close()
    mark = int(seq_mark_path(path).read_text())
    path.write_bytes(b"not a database" * 100)

    opened = open_outbox(path, clock=lambda: datetime(2026, 1, 2, tzinfo=UTC))
    assert opened.set_aside is not None and opened.set_aside.read_bytes().startswith(b"not a database")
    assert "moved to outbox.sqlite.corrupt-20260102" in opened.describe_loss()
    assert opened.outbox.put(TopicKind.HEARTBEAT, heartbeat()) >= mark > 3
    opened.outbox.close()


def test_only_the_newest_corrupt_outboxes_are_kept(tmp_path: Path) -> None:
    path = tmp_path / "outbox.sqlite"
    for day in range(1, 6):
        path.write_bytes(b"garbage" * 100)
        open_outbox(path, keep=2, clock=lambda day=day: datetime(2026, 1, day, tzinfo=UTC)).outbox.close()  # type: ignore[misc]
    kept = sorted(p.name for p in tmp_path.glob("outbox.sqlite.corrupt-*"))
    assert kept == [
        "outbox.sqlite.corrupt-20260104T000000000000Z",
        "outbox.sqlite.corrupt-20260105T000000000000Z",
    ]


def test_an_outbox_of_a_newer_agent_is_refused_not_set_aside(tmp_path: Path) -> None:
    path = tmp_path / "outbox.sqlite"
    first = open_outbox(path).outbox
    for _ in range(5):
        first.put(TopicKind.HEARTBEAT, heartbeat())
    first.close()
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA user_version=99")  # newer than this agent: refused, but readable
    conn.commit()
    conn.close()
    with pytest.raises(OutboxError):  # not corrupt: never moved aside (a newer agent's outbox)
        open_outbox(path)
    assert not list(tmp_path.glob("*.corrupt-*"))


# -- crash loops -----------------------------------------------------------------------------------


def died_loading(device: Device) -> Device:
    """The process died inside the load its state marks: a new process over the same files."""
    state = load_state(device.config.state_path)
    assert state.loading is not None, "no load was in progress"
    save_state(device.config.state_path, state.after_restart())
    return device.restarted()


class CrashingLoader:
    """Stands for a runtime that kills the process: the load stops the test's 'process' by
    raising an exception no refusal catches, leaving the persisted marker behind."""

    class Died(BaseException):
        pass

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def __call__(self, **kwargs: Any) -> Any:
        if kwargs["model_id"] == "tiny" and b"tiny-2" in Path(kwargs["model_path"]).read_bytes()[:6]:
            raise CrashingLoader.Died()
        return self.inner(**kwargs)


async def test_a_release_the_process_dies_loading_twice_is_refused_until_a_newer_generation(
    device: Device,
) -> None:
    await device.deploy(1, TINY)
    for crash in range(2):
        device.updater.loader = CrashingLoader(device.loader)
        with pytest.raises(CrashingLoader.Died):
            await device.deploy(2, TINY2)
        marker = load_state(device.config.state_path).loading
        assert marker is not None and (marker.version, marker.generation, marker.crashes) == (2, 2, crash)
        device = died_loading(device)
        await device.updater.restore()
        assert device.updater.models.get("tiny") is not None  # the old release serves

    loads_before = len(device.loader.loads())
    await device.deploy(2, TINY2)
    assert len(device.loader.loads()) == loads_before, "a crash-refused release was loaded again"
    state = device.state
    assert (state.phase, state.desired_generation, state.last_error_kind) == (
        S.DEVICE_STATE_FAILED,
        2,
        "RuntimeCrashedWhileLoading",
    )
    assert "crashed while loading tiny@2" in state.last_error
    assert device.transitions[-1][:2] == (S.DEVICE_STATE_FAILED, 2)  # the load-failure report
    assert state.model("tiny") is not None and state.model("tiny").version == 1  # type: ignore[union-attr]

    await device.deploy(3, TINY2)  # a newer generation is a new chance
    assert (device.state.applied_generation, device.state.model("tiny").version) == (3, 2)  # type: ignore[union-attr]


async def test_one_death_in_a_load_is_retried_and_a_success_forgets_it(device: Device) -> None:
    await device.deploy(1, TINY)
    device.updater.loader = CrashingLoader(device.loader)
    with pytest.raises(CrashingLoader.Died):
        await device.deploy(2, TINY2)
    device = died_loading(device)
    await device.updater.restore()
    await device.deploy(2, TINY2)
    state = load_state(device.config.state_path)
    assert (state.applied_generation, state.loading, state.crashed) == (2, None, ())


def test_after_restart_counts_the_load_the_process_died_in() -> None:
    attempt = LoadAttempt(bundle="m", version=2, artifact_sha256="ab", generation=7)
    state = AgentState().load_started(attempt).after_restart()
    assert state.loading is None and state.crashed == (replace(attempt, crashes=1),)
    assert state.crash_refused(attempt) is None
    state = state.load_started(attempt)
    assert state.loading == replace(attempt, crashes=1)
    state = state.after_restart()
    assert state.crash_refused(attempt) == replace(attempt, crashes=2)
    assert state.crash_refused(replace(attempt, generation=8)) is None


# -- reports name the generation applied -----------------------------------------------------------


async def test_metadata_behind_the_nudge_reports_the_applied_generation_and_retries(device: Device) -> None:
    await device.deploy(1, TINY)
    behind = Director(Assignment(generation=1, releases=(TINY,)))
    with pytest.raises(ControlPlaneUnavailable):
        await device.updater.apply(device_pb2.DesiredState(generation=2), behind, device.server)  # type: ignore[arg-type]
    phase, generation, _ = device.transitions[-1]
    assert (phase, generation) == (S.DEVICE_STATE_ACTIVE, 1)


def test_the_start_report_names_the_applied_generation_while_serving() -> None:
    working = AgentState(phase=S.DEVICE_STATE_ACTIVE, desired_generation=5, applied_generation=4)
    assert reported_generation(working) == 4
    refused = replace(working, phase=S.DEVICE_STATE_FAILED)
    assert reported_generation(refused) == 5


# -- artifacts of impossible length -------------------------------------------------------------------


class Chunks:
    """FetchArtifact answering with the given chunks."""

    def __init__(self, *chunks: device_pb2.ArtifactChunk) -> None:
        self.chunks = chunks
        self.calls = 0

    def FetchArtifact(self, request: Any, metadata: object = None) -> AsyncIterator[device_pb2.ArtifactChunk]:
        self.calls += 1

        async def stream() -> AsyncIterator[device_pb2.ArtifactChunk]:
            for chunk in self.chunks:
                yield chunk

        return stream()


def store(tmp_path: Path) -> ArtifactStore:
    return ArtifactStore(tmp_path / "artifacts", tmp_path / "downloads")


async def test_a_zero_length_artifact_is_refused_before_any_download(tmp_path: Path) -> None:
    empty = hashlib.sha256(b"").hexdigest()
    info = rel.ArtifactInfo("m/1/model.gguf", 0, empty)
    server = Chunks()
    with pytest.raises(EmptyArtifact, match=r"signed with length 0: an empty model file cannot be installed"):
        await store(tmp_path).fetch(server, info)  # type: ignore[arg-type]
    assert server.calls == 0
    assert not (tmp_path / "artifacts" / empty).exists()


async def test_a_source_serving_another_length_is_refused_not_retried(tmp_path: Path) -> None:
    payload = b"x" * 100
    info = rel.ArtifactInfo("m/1/model.gguf", 100, hashlib.sha256(payload).hexdigest())
    server = Chunks(device_pb2.ArtifactChunk(offset=0, data=payload[:60], total_length=60))
    with pytest.raises(SourceLengthMismatch, match=r"serves .* with 60 bytes, its signed length is 100"):
        await store(tmp_path).fetch(server, info)  # type: ignore[arg-type]
    assert server.calls == 1


def test_an_installed_artifact_missing_or_resized_is_a_typed_refusal(tmp_path: Path) -> None:
    artifacts = store(tmp_path)
    with pytest.raises(InstalledArtifactMissing, match=r"the artifact of m@1 .* is missing"):
        artifacts.installed("ab" * 32, 10, what="m@1")
    artifacts.artifact_dir.mkdir(parents=True)
    artifacts.path("ab" * 32).write_bytes(b"x" * 4)
    with pytest.raises(InstalledArtifactDamaged, match="has 4 bytes, 10 were verified"):
        artifacts.installed("ab" * 32, 10, what="m@1")
