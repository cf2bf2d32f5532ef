"""LoRA adapters served as models of their own: ``<model>:<adapter>`` leases the model and names
the adapter (fakes stand in for runtimes)."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgefleet.agent.runtimes.base import GENERATIVE, Capability, LoraRequest
from edgefleet.agent.runtimes.lora import LoraInfo, LoraNameRefused, UnknownLora, check_name
from edgefleet.agent.runtimes.model_table import ModelNotServed, ModelTable, NoActiveModel
from tests.unit.test_api import FakeRuntime


class FakeLoraRuntime(FakeRuntime):
    def __init__(self, model_id: str, *adapters: str) -> None:
        super().__init__(model_id=model_id, capabilities=GENERATIVE | {Capability.LORA})
        self.adapters = {name: self._info(name) for name in adapters}

    @staticmethod
    def _info(name: str) -> LoraInfo:
        return LoraInfo(
            name=name,
            path=Path(f"{name}.gguf"),
            size_bytes=1,
            rank=1,
            alpha=1.0,
            tensors=1,
            architecture="llama",
        )

    def load_lora(self, name: str, path: Path) -> LoraInfo:
        self.adapters[name] = self._info(name)
        return self.adapters[name]

    def unload_lora(self, name: str) -> None:
        if self.adapters.pop(name, None) is None:
            raise UnknownLora(name, sorted(self.adapters))

    def loras(self) -> tuple[LoraInfo, ...]:
        return tuple(self.adapters[name] for name in sorted(self.adapters))


def test_adapters_are_served_as_models_of_their_own() -> None:
    smol = FakeLoraRuntime("smol", "style", "terse")
    plain = FakeRuntime(model_id="plain")
    table = ModelTable(smol, plain)
    assert table.served_names() == ["plain", "smol", "smol:style", "smol:terse"]
    lease, lora = table.lease_model("smol:style")
    assert lease.runtime is smol and lora == LoraRequest("style")
    assert table.in_flight(smol) == 1
    lease.release()
    lease, lora = table.lease_model("smol")
    assert lease.runtime is smol and lora is None
    lease.release()
    smol.unload_lora("terse")
    assert table.served_names() == ["plain", "smol", "smol:style"]


@pytest.mark.parametrize("name", ["smol:terse", "plain:style", "other:style", "other", "smol:"])
def test_unknown_models_and_adapters_are_not_served(name: str) -> None:
    smol = FakeLoraRuntime("smol", "style")
    table = ModelTable(smol, FakeRuntime(model_id="plain"))
    with pytest.raises(ModelNotServed) as refused:
        table.lease_model(name)
    assert refused.value.requested == name
    assert refused.value.served == ["plain", "smol", "smol:style"]
    assert table.in_flight(smol) == 0  # no lease left behind


def test_a_model_named_with_the_separator_is_leased_as_it_is() -> None:
    odd = FakeRuntime(model_id="odd:name")
    table = ModelTable(odd)
    lease, lora = table.lease_model("odd:name")
    assert lease.runtime is odd and lora is None
    lease.release()
    with pytest.raises(NoActiveModel):
        ModelTable().lease_model("smol:style")


def test_latest_is_no_adapter_name() -> None:
    for name in ("latest", "LATEST"):
        with pytest.raises(LoraNameRefused):
            check_name(name)
