"""Two error families: every error the update path can meet is a Refusal (reported, never
retried) or a TransientFailure (retried, never reported as a refusal), never both; an OSError
is sorted by errno; and a transient error met during an update leaves the generation to be
retried instead of refusing it."""

from __future__ import annotations

import errno
import inspect
import io
import tarfile
from pathlib import Path
from types import ModuleType

import pytest

from edgefleet.agent.config import AgentConfig
from edgefleet.agent.runtimes import base as runtimes_base
from edgefleet.agent.runtimes.base import RuntimeUnloaded
from edgefleet.agent.update import (
    archive,
    artifacts,
    errors,
    lifecycle,
    planning,
    selection,
    state,
    steps,
    updater,
    uptane_client,
)
from edgefleet.agent.update.errors import (
    DiskBusy,
    DiskRefused,
    Refusal,
    TransientFailure,
    os_error_family,
    typed_os_errors,
)
from edgefleet.agent.update.state import load_state
from edgefleet.protos.fleet import release
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

MODULES: tuple[ModuleType, ...] = (
    release,
    runtimes_base,
    errors,
    archive,
    artifacts,
    lifecycle,
    planning,
    selection,
    state,
    steps,
    updater,
    uptane_client,
)
ROOTS = {Refusal, TransientFailure, errors.AgentError, runtimes_base.RuntimeFailure}
"""Bases for callers that map every error (the command line, the API); never raised."""
DEFECTS = {lifecycle.ImpossibleTransition}
"""A bug in the updater: in neither family, so no handler of either swallows it."""


def error_classes() -> set[type[BaseException]]:
    return {
        cls
        for module in MODULES
        for _, cls in inspect.getmembers(module, inspect.isclass)
        if issubclass(cls, BaseException) and cls.__module__ == module.__name__
    }


def test_every_error_of_the_update_path_is_in_exactly_one_family() -> None:
    found = error_classes() - ROOTS - DEFECTS
    assert len(found) > 40  # the release checks, the archive, the runtimes, the agent's own
    both = sorted(c.__name__ for c in found if issubclass(c, Refusal) and issubclass(c, TransientFailure))
    neither = sorted(c.__name__ for c in found if not issubclass(c, (Refusal, TransientFailure)))
    assert (both, neither) == ([], [])
    assert not issubclass(lifecycle.ImpossibleTransition, (Refusal, TransientFailure))


def test_the_families_are_placed_as_their_meaning_says() -> None:
    transient = {c.__name__ for c in error_classes() - ROOTS - DEFECTS if issubclass(c, TransientFailure)}
    # MirrorBytesRefused: a mirror's bytes failed the artifact's hash; the download starts again
    # from the next source, so it is retried, never reported as a refusal of the release.
    assert transient == {
        "ControlPlaneUnavailable",
        "DiskBusy",
        "MirrorBytesRefused",
        "RuntimeUnloaded",
        "StateNotSaved",
    }
    assert issubclass(release.ReleaseError, Refusal)
    assert issubclass(archive.ArchiveError, Refusal)
    assert issubclass(runtimes_base.RuntimeLoadError, Refusal)
    assert not hasattr(release.ReleaseError, "transient")  # the unread flags are gone
    assert not hasattr(runtimes_base.RuntimeFailure, "transient")
    assert not hasattr(errors.AgentError, "transient")


@pytest.mark.parametrize(
    ("code", "family"),
    [
        (errno.ENOSPC, DiskBusy),
        (errno.EDQUOT, DiskBusy),
        (errno.EIO, DiskBusy),
        (errno.EAGAIN, DiskBusy),
        (errno.ECONNRESET, DiskBusy),
        (errno.EACCES, DiskRefused),
        (errno.EROFS, DiskRefused),
        (errno.ENOENT, DiskRefused),
        (errno.ELOOP, DiskRefused),
        (None, DiskRefused),
    ],
)
def test_an_os_error_is_sorted_by_errno(code: int | None, family: type[Exception]) -> None:
    exc = OSError(code, "boom", "/state/x") if code is not None else OSError("no errno")
    typed = os_error_family(exc)
    assert type(typed) is family and typed.errno == code
    with pytest.raises(family) as caught, typed_os_errors():
        raise exc
    assert caught.value.__cause__ is exc


def test_a_disk_full_while_extracting_is_transient_not_a_corrupt_archive(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    packed = tmp_path / "model.tar"
    with tarfile.open(packed, "w") as tar:
        data = b"weights" * 10
        info = tarfile.TarInfo("model.onnx")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))

    def full(*args: object, **kwargs: object) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(archive, "_write_file", full)
    with pytest.raises(DiskBusy) as caught:
        archive.extract_archive(packed, tmp_path / "out", max_total_bytes=1 << 20)
    assert caught.value.errno == errno.ENOSPC and not (tmp_path / "out").exists()

    def refused(*args: object, **kwargs: object) -> int:
        raise OSError(errno.EISDIR, "Is a directory")

    monkeypatch.setattr(archive, "_write_file", refused)
    with pytest.raises(archive.CorruptArchive):
        archive.extract_archive(packed, tmp_path / "out", max_total_bytes=1 << 20)


# -- the updater: transient failures are retried, refusals reported ---------------------------------


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


def failing_publish(code: int) -> object:
    def publish(*args: object, **kwargs: object) -> Path:
        raise OSError(code, "the disk says no")

    return publish


async def test_a_disk_full_during_a_download_is_retried_not_refused(
    device: Device, monkeypatch: pytest.MonkeyPatch
) -> None:
    await device.deploy(1, TINY)
    serving = device.updater.models.get("tiny")
    monkeypatch.setattr(artifacts.ArtifactStore, "_publish", failing_publish(errno.ENOSPC))
    with pytest.raises(DiskBusy):
        await device.deploy(2, TINY2)
    assert device.state.phase == S.DEVICE_STATE_FETCHING  # where it stopped, not FAILED
    assert device.updater.models.get("tiny") is serving
    monkeypatch.undo()
    await device.deploy(2, TINY2)  # the retry the service's apply loop makes
    assert (device.state.phase, device.state.applied_generation) == (S.DEVICE_STATE_ACTIVE, 2)


async def test_a_read_only_artifact_store_refuses_the_generation_with_the_reason(
    device: Device, monkeypatch: pytest.MonkeyPatch
) -> None:
    await device.deploy(1, TINY)
    monkeypatch.setattr(artifacts.ArtifactStore, "_publish", failing_publish(errno.EROFS))
    await device.deploy(2, TINY2)
    state = device.state
    assert (state.phase, state.last_error_kind, state.applied_generation) == (
        S.DEVICE_STATE_FAILED,
        "DiskRefused",
        1,
    )
    assert "the disk says no" in state.last_error
    assert state.model("tiny") is not None and state.model("tiny").version == 1  # type: ignore[union-attr]


async def test_a_runtime_unloaded_during_a_load_is_retried_not_refused(device: Device) -> None:
    await device.deploy(1, TINY)
    inner = device.updater.loader

    def unloaded(**kwargs: object) -> object:
        raise RuntimeUnloaded("the runtime went away under the load")

    device.updater.loader = unloaded  # type: ignore[assignment]
    with pytest.raises(RuntimeUnloaded):
        await device.deploy(2, TINY2)
    state = device.state
    assert state.phase != S.DEVICE_STATE_FAILED and state.last_error == ""
    assert load_state(device.config.state_path).loading is None  # a restart now counts no crash
    device.updater.loader = inner
    await device.deploy(2, TINY2)
    assert device.state.applied_generation == 2
