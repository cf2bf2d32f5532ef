"""Which adapter loads which model format.

A table, not a chain of ifs: adding a backend is one entry. Adapters are named by module so
that importing this registry stays cheap and a device without, say, mlx never imports it; a
format counts as supported only when its backend library is installed.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Final, Protocol, cast

from edgefleet.agent.runtimes.base import Runtime, UnsupportedFormatError
from edgefleet.protos.fleet.v1 import common_pb2


class AdapterFactory(Protocol):
    """Loads a model file and returns a ready runtime, or raises RuntimeLoadError."""

    def __call__(self, *, model_path: Path, model_id: str, n_ctx: int, n_threads: int | None) -> Runtime: ...


@dataclass(frozen=True, slots=True)
class Adapter:
    """Where a format's loader lives and which library it needs."""

    module: str  # defines `load(*, model_path, model_id, n_ctx, n_threads) -> Runtime`
    library: str  # importable name of the backend

    def available(self) -> bool:
        return importlib.util.find_spec(self.library) is not None

    def factory(self) -> AdapterFactory:
        return cast(AdapterFactory, importlib.import_module(self.module).load)


ADAPTERS: Final[Mapping[int, Adapter]] = MappingProxyType(
    {
        common_pb2.MODEL_FORMAT_GGUF: Adapter("edgefleet.agent.runtimes.llama_cpp", "llama_cpp"),
        common_pb2.MODEL_FORMAT_ONNX: Adapter("edgefleet.agent.runtimes.onnx_runtime", "onnxruntime"),
        common_pb2.MODEL_FORMAT_MLX: Adapter("edgefleet.agent.runtimes.mlx_runtime", "mlx_lm"),
    }
)


def supported_formats() -> frozenset[int]:
    """Formats this agent can serve here (backend installed), for selection and reporting."""
    return frozenset(fmt for fmt, adapter in ADAPTERS.items() if adapter.available())


def load_runtime(
    *, fmt: int, model_path: Path, model_id: str, n_ctx: int = 2048, n_threads: int | None = None
) -> Runtime:
    """Load `model_path` with the adapter registered for `fmt` (a fleet.v1.ModelFormat value).

    Raises UnsupportedFormatError for formats without an adapter, RuntimeLoadError when the
    adapter cannot load the file.
    """
    adapter = ADAPTERS.get(fmt)
    if adapter is None or not adapter.available():
        raise UnsupportedFormatError(fmt)
    return adapter.factory()(model_path=model_path, model_id=model_id, n_ctx=n_ctx, n_threads=n_threads)
