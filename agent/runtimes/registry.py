"""Which adapter loads which model format.

A table, not a chain of ifs: adding a backend is one entry. Adapter modules import their
heavy libraries inside their loader, so importing this registry stays cheap.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Final, Protocol

from agent.runtimes import llama_cpp
from agent.runtimes.base import Runtime, UnsupportedFormatError
from protos.fleet.v1 import common_pb2


class AdapterFactory(Protocol):
    """Loads a model file and returns a ready runtime, or raises RuntimeLoadError."""

    def __call__(self, *, model_path: Path, model_id: str, n_ctx: int, n_threads: int | None) -> Runtime: ...


ADAPTERS: Final[Mapping[int, AdapterFactory]] = MappingProxyType(
    {
        common_pb2.MODEL_FORMAT_GGUF: llama_cpp.load,
        # MODEL_FORMAT_ONNX (onnxruntime) and MODEL_FORMAT_MLX (mlx-lm) are not built yet.
    }
)


def supported_formats() -> frozenset[int]:
    """Formats this agent build can serve, for reporting to the control plane."""
    return frozenset(ADAPTERS)


def load_runtime(
    *, fmt: int, model_path: Path, model_id: str, n_ctx: int = 2048, n_threads: int | None = None
) -> Runtime:
    """Load `model_path` with the adapter registered for `fmt` (a fleet.v1.ModelFormat value).

    Raises UnsupportedFormatError for formats without an adapter, RuntimeLoadError when the
    adapter cannot load the file.
    """
    factory = ADAPTERS.get(fmt)
    if factory is None:
        raise UnsupportedFormatError(fmt)
    return factory(model_path=model_path, model_id=model_id, n_ctx=n_ctx, n_threads=n_threads)
