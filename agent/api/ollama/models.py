"""What GET /api/tags, GET /api/ps, POST /api/show and GET /api/version say about this device.

Everything comes from what the device really holds: the model table (every model the fleet
installed), each runtime's description, and the model files on disk. Where Ollama has a
field this device has no source for (family, parameter size, the Modelfile template) it is
left empty rather than guessed. Two fields are this device's own reading of Ollama's:

- `digest` names the installed file (name, path, size, modification time hashed together),
  not its bytes: hashing a model file on every listing would read it all from flash, and the
  update path already verified every byte of it against the signed release;
- `expires_at` in /api/ps is when the keep-alive policy will unload an idle model, or, for a
  model that stays loaded, the far future (as Ollama says for keep_alive < 0).

A LoRA adapter over a model is listed right after it as ``<model>:<adapter>`` (Ollama's tag: a
variant of the model), its details naming the model as `parent_model`, its size and digest
those of the adapter's file; /api/ps lists it while its model is in memory.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from edgefleet.agent.api.ollama.options import DEFAULT_TEMPERATURE, DEFAULT_TOP_K, DEFAULT_TOP_P
from edgefleet.agent.api.ollama.protocol import (
    ListedModel,
    ModelDetails,
    OllamaPsResponse,
    OllamaShowResponse,
    OllamaTagsResponse,
    OllamaVersionResponse,
    RunningModel,
)
from edgefleet.agent.api.served_adapters import ServedAdapter, adapters_of
from edgefleet.agent.runtimes.base import Capability, Runtime, RuntimeDescription, format_name
from edgefleet.agent.runtimes.keep_alive import KeepAliveRuntime
from edgefleet.agent.runtimes.model_table import ModelTable

# The Ollama release whose API shapes these endpoints follow (clients gate features on it).
OLLAMA_API_VERSION = "0.12.0"
_FOREVER = timedelta(days=365 * 100)
_FORMAT_PREFIX = "MODEL_FORMAT_"
# Ollama's capability names for what a runtime can do.
_CAPABILITIES = {Capability.COMPLETIONS: "completion", Capability.EMBEDDINGS: "embedding"}


@dataclass(frozen=True, slots=True)
class ModelFile:
    """A model's files on disk: total size and newest modification."""

    size: int
    modified_ns: int

    @classmethod
    def of(cls, path: Path) -> ModelFile:
        try:
            if path.is_dir():
                stats = [item.stat() for item in path.rglob("*") if item.is_file()]
            else:
                stats = [path.stat()]
        except OSError:  # a model being replaced: report what can be read, not an error
            return cls(size=0, modified_ns=0)
        return cls(
            size=sum(stat.st_size for stat in stats),
            modified_ns=max((stat.st_mtime_ns for stat in stats), default=0),
        )


def rfc3339(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")


def details(description: RuntimeDescription) -> ModelDetails:
    name = format_name(description.format)
    return ModelDetails(format=name.removeprefix(_FORMAT_PREFIX).lower())


def digest(description: RuntimeDescription, file: ModelFile) -> str:
    identity = f"{description.model_id}\0{description.model_path}\0{file.size}\0{file.modified_ns}"
    return hashlib.sha256(identity.encode()).hexdigest()


def adapter_details(adapter: ServedAdapter) -> ModelDetails:
    """The model's details, naming it as the parent: an adapter runs only over its model."""
    return details(adapter.runtime.describe()).model_copy(update={"parent_model": adapter.parent})


def adapter_digest(adapter: ServedAdapter, file: ModelFile) -> str:
    identity = f"{adapter.name}\0{adapter.info.path}\0{file.size}\0{file.modified_ns}"
    return hashlib.sha256(identity.encode()).hexdigest()


def listed(runtime: Runtime) -> ListedModel:
    description = runtime.describe()
    file = ModelFile.of(description.model_path)
    return ListedModel(
        name=description.model_id,
        model=description.model_id,
        modified_at=rfc3339(datetime.fromtimestamp(file.modified_ns / 1e9, UTC)),
        size=file.size,
        digest=digest(description, file),
        details=details(description),
    )


def listed_adapter(adapter: ServedAdapter) -> ListedModel:
    file = ModelFile.of(adapter.info.path)
    return ListedModel(
        name=adapter.name,
        model=adapter.name,
        modified_at=rfc3339(datetime.fromtimestamp(file.modified_ns / 1e9, UTC)),
        size=file.size,
        digest=adapter_digest(adapter, file),
        details=adapter_details(adapter),
    )


def tags(models: ModelTable) -> OllamaTagsResponse:
    listing = []
    for runtime in models.runtimes():
        listing.append(listed(runtime))
        listing.extend(listed_adapter(adapter) for adapter in adapters_of(runtime))
    return OllamaTagsResponse(models=listing)


def expires_at(runtime: Runtime, now: datetime) -> datetime:
    if isinstance(runtime, KeepAliveRuntime) and runtime.keep_alive_s is not None:
        left = runtime.last_used + runtime.keep_alive_s - time.monotonic()
        return now + timedelta(seconds=max(0.0, left))
    return now + _FOREVER


def ps(models: ModelTable) -> OllamaPsResponse:
    """The models in memory now (a keep-alive runtime that unloaded its model is left out)."""
    now = datetime.now(UTC)
    running = []
    for runtime in models.runtimes():
        if isinstance(runtime, KeepAliveRuntime) and not runtime.loaded:
            continue
        description = runtime.describe()
        file = ModelFile.of(description.model_path)
        footprint = runtime.footprint_bytes if isinstance(runtime, KeepAliveRuntime) else 0
        size = footprint or file.size
        expires = rfc3339(expires_at(runtime, now))
        running.append(
            RunningModel(
                name=description.model_id,
                model=description.model_id,
                size=size,
                digest=digest(description, file),
                details=details(description),
                expires_at=expires,
                size_vram=size if description.gpu_offload else 0,
                context_length=description.n_ctx,
            )
        )
        for adapter in adapters_of(runtime):
            adapter_file = ModelFile.of(adapter.info.path)
            running.append(
                RunningModel(
                    name=adapter.name,
                    model=adapter.name,
                    size=adapter_file.size,
                    digest=adapter_digest(adapter, adapter_file),
                    details=adapter_details(adapter),
                    expires_at=expires,  # it leaves memory with its model
                    size_vram=adapter_file.size if description.gpu_offload else 0,
                    context_length=description.n_ctx,
                )
            )
    return OllamaPsResponse(models=running)


def show(runtime: Runtime, adapter: ServedAdapter | None = None) -> OllamaShowResponse:
    """`runtime`'s model, or `adapter` over it (its details naming the model as parent)."""
    description = runtime.describe()
    file = ModelFile.of(description.model_path)
    parameters = {
        "num_ctx": description.n_ctx,
        "temperature": DEFAULT_TEMPERATURE,
        "top_k": DEFAULT_TOP_K,
        "top_p": DEFAULT_TOP_P,
    }
    capabilities = sorted({_CAPABILITIES[c] for c in description.capabilities if c in _CAPABILITIES})
    return OllamaShowResponse(
        modelfile=f"# Installed by the fleet; not changed here.\nFROM {description.model_path}\n"
        + ("" if adapter is None else f"ADAPTER {adapter.info.path}\n"),  # the Modelfile's own word
        parameters="\n".join(f"{name:<30} {value}" for name, value in parameters.items()),
        template="",
        details=details(description) if adapter is None else adapter_details(adapter),
        model_info={
            "edgefleet.runtime": description.runtime,
            "edgefleet.context_length": description.n_ctx,
            "edgefleet.device": description.device,
            "edgefleet.threads": description.n_threads,
        },
        capabilities=capabilities,
        modified_at=rfc3339(datetime.fromtimestamp(file.modified_ns / 1e9, UTC)),
    )


def version() -> OllamaVersionResponse:
    return OllamaVersionResponse(version=OLLAMA_API_VERSION)
