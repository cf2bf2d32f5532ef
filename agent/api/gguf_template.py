"""A GGUF file's chat template and BOS/EOS texts, read from its header only.

The tool format a model was trained on is declared by its chat template
(``tokenizer.chat_template``), which the API needs before the runtime renders anything.
gguf's own ``GGUFReader`` maps every tensor and field (seconds for a 100 MB file), so this
reads the key-value header alone, walking the token list once to find the BOS and EOS
texts the template writes. Results are kept per file (path, size, mtime).
"""

from __future__ import annotations

import struct
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

_MAGIC = b"GGUF"
_FIXED = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}  # type -> bytes
_INTEGER = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 10: "<Q", 11: "<q"}
_STRING, _ARRAY = 8, 9
_MAX_TEMPLATE_BYTES = 1 << 20


class GGUFHeaderError(ValueError):
    """The file is not a GGUF file this reader understands."""


@dataclass(frozen=True, slots=True)
class ModelTemplate:
    """What rendering a GGUF's chat template needs besides the messages."""

    template: str
    bos_token: str = ""
    eos_token: str = ""


def _read(stream: BinaryIO, size: int) -> bytes:
    data = stream.read(size)
    if len(data) != size:
        raise GGUFHeaderError("truncated GGUF header")
    return data


def _u32(stream: BinaryIO) -> int:
    return int(struct.unpack("<I", _read(stream, 4))[0])


def _u64(stream: BinaryIO) -> int:
    return int(struct.unpack("<Q", _read(stream, 8))[0])


def _string(stream: BinaryIO, *, keep: bool = True) -> bytes:
    size = _u64(stream)
    if not keep:
        stream.seek(size, 1)
        return b""
    return _read(stream, size)


def read_template(path: Path) -> ModelTemplate | None:
    """The chat template of the GGUF at ``path`` (None if it declares none)."""
    template: str | None = None
    ids: dict[str, int] = {}
    tokens: list[bytes] = []
    with path.open("rb") as stream:
        if _read(stream, 4) != _MAGIC:
            raise GGUFHeaderError(f"{path} is not a GGUF file")
        version = _u32(stream)
        if version < 2:
            raise GGUFHeaderError(f"GGUF version {version} is not supported")
        _u64(stream)  # tensors
        for _ in range(_u64(stream)):
            key = _string(stream).decode("utf-8", "replace")
            kind = _u32(stream)
            if kind == _STRING:
                keep = key == "tokenizer.chat_template"
                value = _string(stream, keep=keep)
                if keep:
                    if len(value) > _MAX_TEMPLATE_BYTES:
                        raise GGUFHeaderError("chat template too large")
                    template = value.decode("utf-8", "replace")
            elif kind == _ARRAY:
                item, count = _u32(stream), _u64(stream)
                if item == _STRING:
                    keep = key == "tokenizer.ggml.tokens"
                    for _ in range(count):
                        token = _string(stream, keep=keep)
                        if keep:
                            tokens.append(token)
                elif item in _FIXED:
                    stream.seek(_FIXED[item] * count, 1)
                else:
                    raise GGUFHeaderError(f"unsupported array item type {item} in {key}")
            elif kind in _FIXED:
                data = _read(stream, _FIXED[kind])
                if kind in _INTEGER and key in ("tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id"):
                    ids[key.split(".")[-1]] = int(struct.unpack(_INTEGER[kind], data)[0])
            else:
                raise GGUFHeaderError(f"unsupported value type {kind} in {key}")
    if not template:
        return None

    def text(name: str) -> str:
        index = ids.get(name, -1)
        return tokens[index].decode("utf-8", "replace") if 0 <= index < len(tokens) else ""

    return ModelTemplate(template, bos_token=text("bos_token_id"), eos_token=text("eos_token_id"))


_cache: dict[tuple[str, int, int], ModelTemplate | None] = {}
_lock = threading.Lock()


def model_template(path: Path) -> ModelTemplate | None:
    """`read_template`, remembered per file version; None for anything that is not a GGUF file."""
    try:
        stat = path.stat()
    except OSError:
        return None
    if not path.is_file():
        return None
    key = (str(path), stat.st_size, stat.st_mtime_ns)
    with _lock:
        if key in _cache:
            return _cache[key]
    try:
        found = read_template(path)
    except (GGUFHeaderError, OSError):
        found = None
    with _lock:
        _cache[key] = found
    return found
