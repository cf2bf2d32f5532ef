"""GGUF variants through llama.cpp's own quantizer (``llama_model_quantize``).

The quantizer is called through llama-cpp-python's low-level binding rather than the
``llama-quantize`` binary, which the Python wheel does not ship. A source that is already
quantized (most GGUFs published for small devices) is requantized with
``allow_requantize``: quality can only go down from the source's precision, and the row
says so, so nobody mistakes a Q8_0 made from Q4_K_M for a Q8_0 made from F16.
"""

from __future__ import annotations

import ctypes
import logging
import os
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

from edgefleet.controlplane.build.gguf_info import SCALARS, HeaderReader
from edgefleet.controlplane.build.ladder.perplexity import measure_gguf
from edgefleet.controlplane.build.ladder.types import (
    EvalConfig,
    InvalidSettings,
    Measurement,
    ModelFormat,
    QuantizationFailed,
    QuantizedArtifact,
    RuntimeUnavailable,
    Tokenizer,
    UnsupportedSource,
)

GGUF_MAGIC = b"GGUF"

# Ladder name -> llama.cpp file type constant, resolved on use so that importing this
# module does not load the llama.cpp shared library.
FTYPES: MappingProxyType[str, str] = MappingProxyType(
    {
        "q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0",
        "q4_1": "LLAMA_FTYPE_MOSTLY_Q4_1",
        "q5_0": "LLAMA_FTYPE_MOSTLY_Q5_0",
        "q5_1": "LLAMA_FTYPE_MOSTLY_Q5_1",
        "q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0",
        "q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M",
        "q5_k_m": "LLAMA_FTYPE_MOSTLY_Q5_K_M",
        "q6_k": "LLAMA_FTYPE_MOSTLY_Q6_K",
        "f16": "LLAMA_FTYPE_MOSTLY_F16",
    }
)

# GGML tensor types that hold unquantized values; any other type in a file means its
# weights were already quantized.
_UNQUANTIZED_TENSOR_TYPES = frozenset({"F32", "F16", "BF16", "F64", "I8", "I16", "I32", "I64"})


def is_gguf(path: Path) -> bool:
    """True when the file starts with the GGUF magic (the suffix is not trusted)."""
    try:
        with path.open("rb") as f:
            return f.read(len(GGUF_MAGIC)) == GGUF_MAGIC
    except OSError:
        return False


def ftype_for(quantization: str) -> int:
    """The LLAMA_FTYPE_* value for a ladder name; raises QuantizationFailed if this llama.cpp lacks it."""
    import llama_cpp

    constant = FTYPES[quantization]
    value = getattr(llama_cpp, constant, None)
    if not isinstance(value, int):
        raise QuantizationFailed(f"this llama-cpp-python has no {constant} for {quantization!r}")
    return value


@dataclass(frozen=True, slots=True)
class GgufHeader:
    """What the ladder needs from a GGUF header: the declared file type and the tensor types."""

    file_type: int | None  # general.file_type (a LLAMA_FTYPE_* value), None when absent
    tensor_types: frozenset[str]  # GGML type names, e.g. {"F32", "Q4_K", "Q6_K"}

    @property
    def quantized_types(self) -> frozenset[str]:
        """The tensor types that hold already-quantized weights."""
        return self.tensor_types - _UNQUANTIZED_TENSOR_TYPES

    @property
    def label(self) -> str:
        """llama.cpp's name for the file type, lowercase ("q4_k_m", "all_f32", "f16")."""
        from gguf import LlamaFileType

        if self.file_type is None:
            return "unknown"
        try:
            return LlamaFileType(self.file_type).name.removeprefix("MOSTLY_").lower()
        except ValueError:
            return f"type{self.file_type}"


def read_gguf_header(path: Path) -> GgufHeader:
    """Reads general.file_type and every tensor's type, skipping the rest of the header."""
    from gguf import GGMLQuantizationType

    try:
        with path.open("rb") as f:
            if f.read(len(GGUF_MAGIC)) != GGUF_MAGIC:
                raise UnsupportedSource(f"{path} is not a GGUF file")
            version = struct.unpack("<I", f.read(4))[0]
            reader = HeaderReader(f, "<" if version & 0xFFFF else ">")  # big-endian files exist
            n_tensors, n_kv = reader.u64(), reader.u64()
            file_type: int | None = None
            for _ in range(n_kv):
                key, value_type = reader.string(), reader.u32()
                if key == "general.file_type" and value_type in SCALARS:
                    file_type = int(reader.scalar(SCALARS[value_type]))
                else:
                    reader.skip_value(value_type)
            type_ids: set[int] = set()
            for _ in range(n_tensors):
                reader.skip(reader.u64())  # name
                reader.skip(8 * reader.u32())  # dims
                type_ids.add(reader.u32())
                reader.skip(8)  # data offset
    except (OSError, struct.error) as exc:
        raise UnsupportedSource(f"{path} is not a readable GGUF file: {exc}") from exc
    names = set()
    for type_id in type_ids:
        try:
            names.add(GGMLQuantizationType(type_id).name)
        except ValueError:
            names.add(f"type{type_id}")
    return GgufHeader(file_type=file_type, tensor_types=frozenset(names))


def quantize_gguf(source: Path, dest: Path, quantization: str, *, n_threads: int = 0) -> QuantizedArtifact:
    """Writes `source` quantized to `quantization` at `dest` (atomically: temp file, then rename).

    n_threads <= 0 lets llama.cpp use every hardware thread.
    """
    try:
        import llama_cpp
    except ImportError as exc:
        raise RuntimeUnavailable("llama-cpp-python is not installed (install edgefleet[agent])") from exc
    ftype = ftype_for(quantization)
    already = read_gguf_header(source).quantized_types
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = n_threads
    params.allow_requantize = bool(already)
    partial = dest.with_name(f".{dest.name}.partial")
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        with _quiet_llama_log():
            status = llama_cpp.llama_model_quantize(
                os.fsencode(source), os.fsencode(partial), ctypes.byref(params)
            )
        if status != 0 or not partial.is_file():
            raise QuantizationFailed(
                f"llama_model_quantize({source.name} -> {quantization}) returned {status}"
            )
        os.replace(partial, dest)
    finally:
        partial.unlink(missing_ok=True)
    note = f"requantized from {', '.join(sorted(already))} (allow_requantize)" if already else ""
    return QuantizedArtifact(quantization=quantization, paths=(dest,), note=note)


@contextmanager
def _quiet_llama_log() -> Iterator[None]:
    """The quantizer logs a line per tensor; keep only errors while it runs."""
    logger = logging.getLogger("llama-cpp-python")
    previous = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(previous)


@dataclass(frozen=True, slots=True)
class GgufBackend:
    """The ladder backend for GGUF files (see :class:`.types.LadderBackend`)."""

    @property
    def format(self) -> ModelFormat:
        return ModelFormat.GGUF

    def quantization_names(self) -> tuple[str, ...]:
        return tuple(FTYPES)

    def ensure_available(self) -> None:
        import importlib.util

        if importlib.util.find_spec("llama_cpp") is None:
            raise RuntimeUnavailable("llama-cpp-python is not installed (install edgefleet[agent])")

    def source_label(self, source: Path) -> str:
        return read_gguf_header(source).label

    def variant_path(self, out_dir: Path, quantization: str) -> Path:
        return out_dir / f"model.{quantization}.gguf"

    def files(self, model: Path) -> tuple[Path, ...]:
        return (model,)

    def quantize(self, source: Path, dest: Path, quantization: str, *, n_threads: int) -> QuantizedArtifact:
        return quantize_gguf(source, dest, quantization, n_threads=n_threads)

    def measure(
        self, model: Path, *, text: str, config: EvalConfig, n_threads: int, tokenizer: Tokenizer | None
    ) -> Measurement:
        if tokenizer is not None:
            raise InvalidSettings("GGUF models carry their own tokenizer; do not pass one")
        return measure_gguf(model, text=text, config=config, n_threads=n_threads)
