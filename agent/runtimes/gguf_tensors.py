"""A GGUF file's scalar metadata and tensor table, read from its header without the gguf package.

The agent checks a LoRA adapter against the base model it will patch before llama.cpp sees
it: llama.cpp answers a wrong file with NULL and a line in its log, so the reason (not an
adapter, another architecture, a tensor the base lacks or of the wrong shape, data past the
end of the file) is read here, where it can become a typed error. The ``gguf`` package is a
build-side dependency the device does not install, and its reader decodes every tokenizer
string; this walks the key-value section once, keeping scalars and strings and skipping
arrays by their lengths, then reads the tensor table. Every count and length in the file is
bounded by the file's own size, so a hostile header cannot make it allocate or loop beyond it.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import BinaryIO

MAGIC = b"GGUF"
_VERSIONS = (2, 3)
_DEFAULT_ALIGNMENT = 32
_MAX_DIMS = 4  # GGML_MAX_DIMS
_MAX_KEY_BYTES = 1 << 16
_MAX_KEPT_STRING_BYTES = 1 << 16  # longer strings (a chat template) are skipped, not kept
_STRING, _ARRAY = 8, 9
# GGUF value type -> struct format of a scalar.
_SCALARS = MappingProxyType(
    {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
)
# ggml type -> (elements per block, bytes per block), for the types an adapter's tensors may have.
BLOCK_SIZES = MappingProxyType({0: (1, 4), 1: (1, 2), 8: (32, 34), 30: (1, 2)})
TYPE_NAMES = MappingProxyType({0: "F32", 1: "F16", 8: "Q8_0", 30: "BF16"})

Scalar = int | float | bool | str


class GgufFormatError(ValueError):
    """The file is not a GGUF file this reader understands (or it is truncated)."""


@dataclass(frozen=True, slots=True)
class TensorInfo:
    """One tensor's entry in the table; ``shape`` is in ggml order (ne[0] first, the row length)."""

    name: str
    shape: tuple[int, ...]
    ggml_type: int
    offset: int  # from the start of the data section

    def nbytes(self) -> int | None:
        """The tensor's data size, or None for a ggml type outside `BLOCK_SIZES`."""
        sizes = BLOCK_SIZES.get(self.ggml_type)
        if sizes is None:
            return None
        block, size = sizes
        if not self.shape or self.shape[0] % block:
            return None
        count = self.shape[0] // block * size
        for dim in self.shape[1:]:
            count *= dim
        return count


@dataclass(frozen=True, slots=True)
class GgufLayout:
    """What the header says: scalar and string metadata (arrays left out) and the tensor table."""

    metadata: dict[str, Scalar]
    tensors: dict[str, TensorInfo]
    data_start: int  # file offset of the data section
    file_size: int

    def string(self, key: str) -> str | None:
        value = self.metadata.get(key)
        return value if isinstance(value, str) else None

    def number(self, key: str) -> float | None:
        value = self.metadata.get(key)
        return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


class _Reader:
    def __init__(self, stream: BinaryIO, size: int) -> None:
        self._stream = stream
        self._size = size

    def read(self, count: int) -> bytes:
        data = self._stream.read(count)
        if len(data) != count:
            raise GgufFormatError("truncated GGUF header")
        return data

    def scalar(self, fmt: str) -> int | float | bool:
        value: int | float | bool = struct.unpack(fmt, self.read(struct.calcsize(fmt)))[0]
        return value

    def count(self, what: str) -> int:
        """A u64 length or count; no length in a file exceeds the file."""
        value = int(self.scalar("<Q"))
        if value > self._size:
            raise GgufFormatError(f"{what} ({value}) exceeds the file's size")
        return value

    def skip(self, count: int) -> None:
        if self._stream.tell() + count > self._size:
            raise GgufFormatError("truncated GGUF header")
        self._stream.seek(count, 1)

    def string(self, *, limit: int | None = None) -> str | None:
        """A GGUF string; None (skipped) when longer than ``limit``."""
        length = self.count("a string's length")
        if limit is not None and length > limit:
            self.skip(length)
            return None
        return self.read(length).decode("utf-8", errors="replace")

    def value(self, kind: int) -> Scalar | None:
        """A metadata value; arrays and over-long strings are skipped (None)."""
        if kind == _STRING:
            return self.string(limit=_MAX_KEPT_STRING_BYTES)
        if kind == _ARRAY:
            item_kind = int(self.scalar("<I"))
            items = self.count("an array's length")
            if item_kind in _SCALARS:
                self.skip(items * struct.calcsize(_SCALARS[item_kind]))
            elif item_kind == _STRING:
                for _ in range(items):
                    self.skip(self.count("a string's length"))
            else:
                raise GgufFormatError(f"unsupported GGUF array item type {item_kind}")
            return None
        fmt = _SCALARS.get(kind)
        if fmt is None:
            raise GgufFormatError(f"unknown GGUF value type {kind}")
        return self.scalar(fmt)


def read_layout(path: Path) -> GgufLayout:
    """Raises GgufFormatError for anything but a well-formed GGUF header, OSError if unreadable."""
    size = path.stat().st_size
    with path.open("rb", buffering=1 << 20) as stream:
        reader = _Reader(stream, size)
        if stream.read(4) != MAGIC:
            raise GgufFormatError("not a GGUF file (bad magic)")
        version = int(reader.scalar("<I"))
        if version not in _VERSIONS:
            raise GgufFormatError(f"unsupported GGUF version {version}")
        n_tensors = reader.count("the tensor count")
        n_kv = reader.count("the metadata count")
        metadata: dict[str, Scalar] = {}
        for _ in range(n_kv):
            key = reader.string(limit=_MAX_KEY_BYTES)
            if key is None:
                raise GgufFormatError("a metadata key is too long")
            value = reader.value(int(reader.scalar("<I")))
            if value is not None:
                metadata[key] = value
        tensors: dict[str, TensorInfo] = {}
        for _ in range(n_tensors):
            name = reader.string(limit=_MAX_KEY_BYTES)
            if name is None:
                raise GgufFormatError("a tensor name is too long")
            n_dims = int(reader.scalar("<I"))
            if not 0 < n_dims <= _MAX_DIMS:
                raise GgufFormatError(f"tensor {name!r} has {n_dims} dimensions")
            shape = tuple(reader.count("a tensor dimension") for _ in range(n_dims))
            ggml_type = int(reader.scalar("<I"))
            offset = reader.count("a tensor offset")
            if name in tensors:
                raise GgufFormatError(f"tensor {name!r} is listed twice")
            tensors[name] = TensorInfo(name=name, shape=shape, ggml_type=ggml_type, offset=offset)
        alignment = metadata.get("general.alignment", _DEFAULT_ALIGNMENT)
        if not isinstance(alignment, int) or isinstance(alignment, bool) or alignment <= 0:
            raise GgufFormatError(f"invalid general.alignment {alignment!r}")
        data_start = -(-stream.tell() // alignment) * alignment
    return GgufLayout(metadata=metadata, tensors=tensors, data_start=data_start, file_size=size)
