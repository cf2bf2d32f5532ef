"""Reads what a bundle manifest needs from a GGUF file's header, via the `gguf` package."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


class GgufError(Exception):
    """The file is not a readable GGUF model."""


@dataclass(frozen=True, slots=True)
class GgufInfo:
    architecture: str
    quantization: str  # llama.cpp's file type name, e.g. "Q4_1"
    context_length: int
    has_chat_template: bool
    model_name: str


def read_gguf_info(path: Path) -> GgufInfo:
    """Returns architecture, quantization, trained context length and chat-template presence."""
    from gguf import GGUFReader, LlamaFileType  # heavy (numpy): only when building bundles

    try:
        reader = GGUFReader(str(path))
    except (ValueError, OSError) as exc:
        raise GgufError(f"{path} is not a readable GGUF file: {exc}") from exc

    def field(key: str) -> object:
        f = reader.fields.get(key)
        return None if f is None else f.contents()

    arch = str(field("general.architecture") or "unknown")
    file_type = field("general.file_type")
    try:
        quant = (
            LlamaFileType(int(str(file_type))).name.removeprefix("MOSTLY_") if file_type is not None else ""
        )
    except ValueError:
        quant = f"type{file_type}"
    ctx = field(f"{arch}.context_length")
    return GgufInfo(
        architecture=arch,
        quantization=quant or "unknown",
        context_length=int(ctx) if isinstance(ctx, int) else 0,
        has_chat_template=field("tokenizer.chat_template") is not None,
        model_name=str(field("general.name") or path.stem),
    )
