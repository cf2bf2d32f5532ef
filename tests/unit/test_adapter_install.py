"""LoRA adapter releases on the device (fake runtimes that hold adapters): installed only over the
base release they name, loaded over its runtime without loading it again, unloaded when
undeployed, loaded again after a restart; the refusals name the base or the adapter, and the
base keeps serving through every one."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgefleet.agent.config import AgentConfig
from edgefleet.agent.runtimes.base import Runtime
from edgefleet.agent.runtimes.lora import LoraFileInvalid, LoraInfo
from edgefleet.agent.tasks.status import installed_models
from edgefleet.agent.update.adapters import AdapterBaseMissing, AdapterBaseNeeded
from edgefleet.agent.update.uptane_client import RecoveredInstall, Recovery, rebuilt_state
from edgefleet.protos.fleet import release as rel
from edgefleet.protos.fleet import uptane
from edgefleet.protos.fleet.v1 import bundle_pb2, common_pb2
from tests.unit.test_device_config_agent import (
    ArtifactServer,
    Device,
    gguf_release,
    make_device,
    payloads,
)
from tests.unit.test_model_table_lora import FakeLoraRuntime

S = common_pb2


class RefusingLoraRuntime(FakeLoraRuntime):
    """Refuses the adapter files (by sha256, their name in the store) in ``refuse``, as llama.cpp
    refuses a file for another model."""

    def __init__(self, model_id: str, refuse: set[str]) -> None:
        super().__init__(model_id)
        self.refuse = refuse

    def load_lora(self, name: str, path: Path) -> LoraInfo:
        assert path.is_file()
        if path.name in self.refuse:
            raise LoraFileInvalid(f"{path} does not fit {self.model_id}")
        return super().load_lora(name, path)


class LoraLoader:
    def __init__(self) -> None:
        self.loads: list[str] = []
        self.refuse: set[str] = set()

    def __call__(
        self, *, fmt: int, model_path: Path, model_id: str, n_ctx: int, n_threads: int | None
    ) -> Runtime:
        self.loads.append(model_id)
        return RefusingLoraRuntime(model_id, self.refuse)


def adapter_release(name: str, version: int, base: rel.VerifiedRelease) -> rel.VerifiedRelease:
    made = gguf_release(name, version, ("LORA",))
    (artifact,) = base.artifacts.values()
    made.manifest.adapter_base.CopyFrom(
        bundle_pb2.AdapterBase(name=base.name, version=base.version, artifact_sha256=artifact.sha256)
    )
    return made


def sha256_of(release: rel.VerifiedRelease) -> str:
    (artifact,) = release.artifacts.values()
    return artifact.sha256


SMOL = gguf_release("smol", 1)
SMOL2 = gguf_release("smol", 2)
STYLE = adapter_release("style", 1, SMOL)
STYLE2 = adapter_release("style", 2, SMOL)
STYLE_ON_2 = adapter_release("style", 3, SMOL2)


def new_device(config: AgentConfig, loader: LoraLoader) -> Device:
    device = make_device(config, ArtifactServer(payloads(SMOL, SMOL2, STYLE, STYLE2, STYLE_ON_2)))
    device.updater.loader = loader
    return device


@pytest.fixture
def config(tmp_path: Path) -> AgentConfig:
    return AgentConfig(
        controlplane="127.0.0.1:1", state_dir=tmp_path, trust_path=tmp_path / "trust.json", n_ctx=512
    )


@pytest.fixture
def loader() -> LoraLoader:
    return LoraLoader()


@pytest.fixture
def device(config: AgentConfig, loader: LoraLoader) -> Device:
    return new_device(config, loader)


def served(device: Device) -> list[str]:
    return device.updater.models.served_names()


def assert_refused(device: Device, kind: type[Exception], *words: str) -> None:
    state = device.state
    assert state.phase == S.DEVICE_STATE_FAILED
    assert state.last_error_kind == kind.__name__
    for word in words:
        assert word in state.last_error


async def test_an_adapter_loads_over_the_base_it_names_without_loading_the_base_again(
    device: Device, loader: LoraLoader
) -> None:
    await device.deploy(1, SMOL)
    base = device.updater.models.get("smol")
    await device.deploy(2, SMOL, STYLE)
    assert device.state.phase == S.DEVICE_STATE_ACTIVE and device.state.applied_generation == 2
    assert loader.loads == ["smol"]  # the base was loaded once
    assert device.updater.models.get("smol") is base
    assert served(device) == ["smol", "smol:style"]
    record = device.state.model("style")
    assert record is not None and (record.adapter_of, record.version) == ("smol", 1)
    assert record.base_sha256 == next(iter(SMOL.artifacts.values())).sha256
    reported = installed_models(device.updater.models, device.state)
    assert [(m.bundle.name, m.loaded) for m in reported] == [("smol", True), ("style", True)]
    await device.deploy(3, SMOL)
    assert [m.bundle.name for m in installed_models(device.updater.models, device.state)] == ["smol"]


async def test_a_base_and_its_adapter_deploy_together(device: Device) -> None:
    await device.deploy(1, STYLE, SMOL)
    assert device.state.phase == S.DEVICE_STATE_ACTIVE
    assert served(device) == ["smol", "smol:style"]


async def test_an_adapter_without_its_base_is_refused_naming_the_base(device: Device) -> None:
    await device.deploy(1, STYLE)
    assert_refused(device, AdapterBaseMissing, "smol@1")
    assert served(device) == []
    await device.deploy(2, SMOL2, STYLE)  # another version of the base is not its base
    assert_refused(device, AdapterBaseMissing, "smol@1")
    assert served(device) == ["smol"]


async def test_an_adapter_that_fails_to_load_is_refused_and_the_base_keeps_serving(
    device: Device, loader: LoraLoader
) -> None:
    await device.deploy(1, SMOL)
    loader.refuse.add(sha256_of(STYLE))
    await device.deploy(2, SMOL, STYLE)
    assert_refused(device, LoraFileInvalid, "style")
    assert served(device) == ["smol"]
    assert device.state.model("style") is None


async def test_a_new_adapter_release_that_fails_leaves_the_old_one_serving(
    device: Device, loader: LoraLoader
) -> None:
    await device.deploy(1, SMOL, STYLE)
    loader.refuse.add(sha256_of(STYLE2))
    await device.deploy(2, SMOL, STYLE2)
    assert_refused(device, LoraFileInvalid)
    record = device.state.model("style")
    assert record is not None and record.version == 1
    assert served(device) == ["smol", "smol:style"]


async def test_undeploying_an_adapter_unloads_it_and_keeps_the_base(device: Device) -> None:
    await device.deploy(1, SMOL, STYLE)
    base = device.updater.models.get("smol")
    await device.deploy(2, SMOL)
    assert device.state.phase == S.DEVICE_STATE_ACTIVE
    assert served(device) == ["smol"] and device.updater.models.get("smol") is base
    assert device.state.model("style") is None


async def test_a_base_an_adapter_needs_is_neither_replaced_nor_removed(device: Device) -> None:
    await device.deploy(1, SMOL, STYLE)
    await device.deploy(2, SMOL2, STYLE)
    assert_refused(device, AdapterBaseNeeded, "smol@1", "style")
    base = device.state.model("smol")
    assert base is not None and base.version == 1
    assert served(device) == ["smol", "smol:style"]
    await device.deploy(3, STYLE)
    assert_refused(device, AdapterBaseNeeded, "style")
    assert served(device) == ["smol", "smol:style"]
    # The adapter moving to the new base with it is fine.
    await device.deploy(4, SMOL2, STYLE_ON_2)
    assert device.state.phase == S.DEVICE_STATE_ACTIVE
    assert served(device) == ["smol", "smol:style"]
    assert [(r.bundle, r.version) for r in device.state.models] == [("smol", 2), ("style", 3)]


async def test_an_installed_adapter_loads_again_over_its_base_after_a_restart(
    config: AgentConfig, device: Device
) -> None:
    await device.deploy(1, SMOL, STYLE)
    loader = LoraLoader()
    again = new_device(config, loader)
    await again.updater.restore()
    assert loader.loads == ["smol"]
    assert served(again) == ["smol", "smol:style"]
    assert again.state.phase == S.DEVICE_STATE_ACTIVE


def test_a_state_rebuilt_from_the_disk_keeps_an_adapter_over_its_base() -> None:
    base = bundle_pb2.AdapterBase(name="smol", version=1, artifact_sha256=sha256_of(SMOL))
    variant = STYLE.manifest.variants[0]
    (info,) = STYLE.artifacts.values()
    target = uptane.ImageTarget(bundle="style", version=1, variant=variant, info=info, adapter_base=base)
    state = rebuilt_state(Recovery(installs=[RecoveredInstall(target)], assigned={"style": 1}))
    (record,) = state.models
    assert (record.bundle, record.adapter_of, record.base_sha256) == ("style", "smol", sha256_of(SMOL))
