"""Reads what a bundle manifest needs from a GGUF file's header, without decoding the vocabulary."""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import BinaryIO

GGUF_MAGIC = b"GGUF"


class GgufError(Exception):
    """The file is not a readable GGUF model."""


@dataclass(frozen=True, slots=True)
class GgufInfo:
    architecture: str
    quantization: str  # llama.cpp's file type name, e.g. "Q4_1"
    context_length: int
    has_chat_template: bool
    model_name: str


# GGUF value type -> struct format of a scalar (STRING = 8 and ARRAY = 9 are read apart).
SCALARS: MappingProxyType[int, str] = MappingProxyType(
    {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
)
_STRING, _ARRAY = 8, 9
_MAX_KEY_BYTES = 1 << 16


class HeaderReader:
    """Sequential reads of GGUF header values; string arrays are skipped, not decoded.

    The ``gguf`` package's reader decodes every tokenizer string, which takes ~12 s for
    Gemma 3's 262,144-entry vocabulary; skipping them reads the same header in well under
    a second.
    """

    def __init__(self, f: BinaryIO, endian: str) -> None:
        self._f = f
        self._endian = endian

    def scalar(self, fmt: str) -> int | float | bool:
        size = struct.calcsize(fmt)
        data = self._f.read(size)
        if len(data) != size:
            raise GgufError("truncated GGUF header")
        value: int | float | bool = struct.unpack(self._endian + fmt, data)[0]
        return value

    def u32(self) -> int:
        return int(self.scalar("I"))

    def u64(self) -> int:
        return int(self.scalar("Q"))

    def string(self) -> str:
        length = self.u64()
        if length > _MAX_KEY_BYTES:  # a corrupt length must not read the whole file into memory
            raise GgufError(f"GGUF key of {length} bytes: corrupt header")
        return self._f.read(length).decode("utf-8", errors="replace")

    def skip(self, count: int) -> None:
        self._f.seek(count, os.SEEK_CUR)

    def skip_value(self, value_type: int) -> None:
        if value_type == _STRING:
            self.skip(self.u64())
        elif value_type == _ARRAY:
            item_type, count = self.u32(), self.u64()
            if item_type in SCALARS:
                self.skip(count * struct.calcsize(SCALARS[item_type]))
            else:
                for _ in range(count):
                    self.skip_value(item_type)
        elif value_type in SCALARS:
            self.skip(struct.calcsize(SCALARS[value_type]))
        else:
            raise GgufError(f"unknown GGUF value type {value_type}")


def read_gguf_info(path: Path) -> GgufInfo:
    """Returns architecture, quantization, trained context length and chat-template presence."""
    from gguf import LlamaFileType  # the file-type names; imported only when building bundles

    values: dict[str, object] = {}
    chat_template = False
    try:
        with path.open("rb") as f:
            if f.read(len(GGUF_MAGIC)) != GGUF_MAGIC:
                raise GgufError(f"{path} is not a readable GGUF file: bad magic")
            version = struct.unpack("<I", f.read(4))[0]
            reader = HeaderReader(f, "<" if version & 0xFFFF else ">")
            _n_tensors, n_kv = reader.u64(), reader.u64()
            for _ in range(n_kv):
                key, value_type = reader.string(), reader.u32()
                if key == "tokenizer.chat_template":
                    chat_template = True
                    reader.skip_value(value_type)
                elif key in ("general.architecture", "general.name") and value_type == _STRING:
                    values[key] = reader.string()
                elif (
                    key == "general.file_type" or key.endswith(".context_length")
                ) and value_type in SCALARS:
                    values[key] = reader.scalar(SCALARS[value_type])
                else:
                    reader.skip_value(value_type)
    except (OSError, struct.error) as exc:
        raise GgufError(f"{path} is not a readable GGUF file: {exc}") from exc
    arch = str(values.get("general.architecture", "unknown"))
    file_type = values.get("general.file_type")
    try:
        quant = LlamaFileType(int(str(file_type))).name.removeprefix("MOSTLY_")
    except ValueError:
        quant = f"type{file_type}" if file_type is not None else "unknown"
    ctx = values.get(f"{arch}.context_length")
    return GgufInfo(
        architecture=arch,
        quantization=quant,
        context_length=int(str(ctx)) if ctx is not None else 0,
        has_chat_template=chat_template,
        model_name=str(values.get("general.name", path.stem)),
    )
