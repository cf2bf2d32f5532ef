"""The LoRA adapters served as models of their own, ``<model>:<adapter>``, for the listings.

`ModelTable.served_names` gives the names a request may use; the listings (GET /v1/models,
Ollama's /api/tags and /api/ps) also need what each adapter is: the model it adapts (vLLM's
``parent``, Ollama's ``parent_model``) and its file. Read at listing time from the runtimes
themselves, so an adapter loaded or unloaded a moment ago is listed as it is now.
"""

from __future__ import annotations

from dataclasses import dataclass

from edgefleet.agent.runtimes.base import Capability, Runtime
from edgefleet.agent.runtimes.lora import LoraInfo, LoraRuntime
from edgefleet.agent.runtimes.model_table import ADAPTER_SEPARATOR, ModelTable


@dataclass(frozen=True, slots=True)
class ServedAdapter:
    """One adapter as requests name it, over the runtime serving its model."""

    runtime: Runtime
    info: LoraInfo

    @property
    def parent(self) -> str:
        """The model it adapts: what a request names to get the model alone."""
        return self.runtime.describe().model_id

    @property
    def name(self) -> str:
        return f"{self.parent}{ADAPTER_SEPARATOR}{self.info.name}"


def adapters_of(runtime: Runtime) -> list[ServedAdapter]:
    """The adapters loaded over `runtime`, by name (none for a runtime without Capability.LORA)."""
    if Capability.LORA not in runtime.describe().capabilities or not isinstance(runtime, LoraRuntime):
        return []
    return [ServedAdapter(runtime, info) for info in runtime.loras()]


def served_adapters(models: ModelTable) -> list[ServedAdapter]:
    """Every adapter over every model in the table, by model then adapter name."""
    return [adapter for runtime in models.runtimes() for adapter in adapters_of(runtime)]


def find_adapter(models: ModelTable, name: str) -> ServedAdapter | None:
    """The adapter ``<model>:<adapter>`` names, or None (a model of that name is not an adapter)."""
    if models.get(name) is not None:
        return None
    base, separator, adapter = name.partition(ADAPTER_SEPARATOR)
    runtime = models.get(base) if separator else None
    if runtime is None:
        return None
    return next((served for served in adapters_of(runtime) if served.info.name == adapter), None)
