"""Turns a quantization ladder's rows into bundle variants (the bridge from ladder to bundle).

GGUF rows are single files and ship as they are. MLX and ONNX variants are folders, shipped
as one deterministic tar built by :func:`edgefleet.controlplane.build.archive_pack.pack_folder`; the device
verifies the tar's hash like any artifact and only then unpacks it with
``edgefleet.agent.update.archive.extract_archive``. An MLX row already is a folder (config, safetensors,
tokenizer). An ONNX row is a graph (plus any external-data files) that a device cannot
serve alone, so its folder is assembled here: the graph as ``model.onnx``, the tokenizer as
``tokenizer.json``, and the Hugging Face configs found beside the tokenizer (context length,
end-of-sequence ids, chat template), which the agent's ONNX runtime reads.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

from edgefleet.controlplane.build.archive_pack import pack_folder
from edgefleet.controlplane.build.bundles import BundleError, VariantFile, gguf_variant
from edgefleet.controlplane.build.ladder import (
    GateStatus,
    LadderResult,
    LadderRow,
    ModelFormat,
    Tokenizer,
    build_ladder,
)
from edgefleet.controlplane.build.ladder.onnx import is_onnx
from edgefleet.protos.fleet.v1 import bundle_pb2, common_pb2

RUNTIME_HEADROOM_BYTES = 256 * 1024 * 1024
TOKENIZER_FILE = "tokenizer.json"
ONNX_COMPANION_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
)
"""Copied from the tokenizer's folder into every ONNX variant when present."""


def load_tokenizer(path: Path) -> Tokenizer:
    """A Hugging Face tokenizer.json as a text -> ids function (needs the `tokenizers` package)."""
    try:
        from tokenizers import Tokenizer as HfTokenizer
    except ImportError as exc:
        raise BundleError(
            "measuring an ONNX model needs the 'tokenizers' package: pip install tokenizers"
        ) from exc
    hf = HfTokenizer.from_file(str(path))

    def encode(text: str) -> Sequence[int]:
        ids: list[int] = hf.encode(text).ids
        return ids

    return encode


def fixed_point(value: float, scale: int) -> int:
    """A non-negative measurement as an integer (0 when it could not be measured)."""
    return round(value * scale) if math.isfinite(value) and value > 0 else 0


def model_folder(row: LadderRow) -> Path:
    """The folder an MLX row's files belong to: where its top-level config.json sits."""
    configs = [path for path in row.paths if path.name == "config.json"]
    if not configs:
        raise BundleError(f"{row.format.value} variant {row.quantization} has no config.json")
    return min(configs, key=lambda path: len(path.parts)).parent


def folder_metadata(folder: Path) -> tuple[int, bool]:
    """(trained context length, has a chat template) from the folder's Hugging Face configs."""
    context = 0
    has_template = (folder / "chat_template.jinja").is_file()
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        value = config.get("max_position_embeddings")
        context = value if isinstance(value, int) and 0 < value < 2**32 else 0
    except (OSError, ValueError):
        pass
    try:
        tokenizer_config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
        has_template = has_template or bool(tokenizer_config.get("chat_template"))
    except (OSError, ValueError):
        pass
    return context, has_template


def mlx_variant(row: LadderRow, *, pack_dir: Path | None) -> tuple[Path, bundle_pb2.Variant]:
    """Packs an MLX row's folder into ``model.<quant>.mlx.tar`` and describes it."""
    folder = model_folder(row)
    quant = row.quantization.lower()
    artifact = f"model.{quant}.mlx.tar"
    archive = pack_folder(folder, (pack_dir or folder.parent) / artifact)
    context, has_template = folder_metadata(folder)
    return archive, folder_variant("mlx", common_pb2.MODEL_FORMAT_MLX, row, archive, context, has_template)


def folder_variant(
    prefix: str, fmt: int, row: LadderRow, archive: Path, context: int, has_template: bool
) -> bundle_pb2.Variant:
    """The manifest entry of a folder variant packed into ``archive``."""
    size = archive.stat().st_size
    return bundle_pb2.Variant(
        id=f"{prefix}-{row.quantization.lower()}",
        format=fmt,  # type: ignore[arg-type]
        quantization=row.quantization.upper(),
        artifact=archive.name,
        size_bytes=size,
        # The tar is unpacked next to itself (2x on disk); the runtime reads the weights into
        # its own memory and needs a KV cache and compute buffers on top.
        min_ram_bytes=2 * size + RUNTIME_HEADROOM_BYTES,
        context_length=context,
        has_chat_template=has_template,
    )


def _link_or_copy(source: Path, dest: Path) -> None:
    """Hard-links when possible (no copy of a large model), copies otherwise."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(source, dest)
    except OSError:
        shutil.copyfile(source, dest)


def onnx_variant(
    row: LadderRow, *, tokenizer_path: Path, pack_dir: Path | None
) -> tuple[Path, bundle_pb2.Variant]:
    """Assembles an ONNX row's serving folder and packs it into ``model.<quant>.onnx.tar``.

    The folder holds the row's graph as model.onnx (external-data files keep their relative
    names, which the graph refers to), the tokenizer as tokenizer.json, and whichever of
    ONNX_COMPANION_FILES sit beside the tokenizer.
    """
    if not tokenizer_path.is_file():
        raise BundleError(f"tokenizer {tokenizer_path} does not exist")
    model, *external = row.paths
    quant = row.quantization.lower()
    artifact = f"model.{quant}.onnx.tar"
    dest_dir = pack_dir or model.parent
    dest_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".onnx-{quant}.", dir=dest_dir))
    try:
        _link_or_copy(model, staging / "model.onnx")
        for path in external:
            _link_or_copy(path, staging / path.relative_to(model.parent))
        _link_or_copy(tokenizer_path, staging / TOKENIZER_FILE)
        for name in ONNX_COMPANION_FILES:
            companion = tokenizer_path.parent / name
            if companion.is_file():
                _link_or_copy(companion, staging / name)
        context, has_template = folder_metadata(staging)
        archive = pack_folder(staging, dest_dir / artifact)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return archive, folder_variant("onnx", common_pb2.MODEL_FORMAT_ONNX, row, archive, context, has_template)


def row_variant(
    row: LadderRow, *, pack_dir: Path | None = None, tokenizer_path: Path | None = None
) -> VariantFile:
    """The manifest entry for one ladder row, with the row's measurements.

    MLX and ONNX rows are packed into a tar under pack_dir (default: beside the model); an
    ONNX row needs the tokenizer.json it is served with (see :func:`onnx_variant`).
    """
    if row.format is ModelFormat.MLX:
        path, variant = mlx_variant(row, pack_dir=pack_dir)
    elif row.format is ModelFormat.ONNX:
        if tokenizer_path is None:
            raise BundleError(
                f"onnx variant {row.quantization} needs its tokenizer.json: "
                "a device cannot serve it without one"
            )
        path, variant = onnx_variant(row, tokenizer_path=tokenizer_path, pack_dir=pack_dir)
    elif len(row.paths) != 1:
        raise BundleError(
            f"{row.format.value} variant {row.quantization} is a folder of {len(row.paths)} files; "
            "only MLX and ONNX variants are packed into archives"
        )
    elif row.format is ModelFormat.GGUF:
        path = row.paths[0]
        variant = gguf_variant(path)
    else:
        raise BundleError(f"{row.format.value} variants cannot be bundled yet")
    variant.perplexity_milli = fixed_point(row.perplexity, 1000)
    variant.perplexity_increase_bp = (
        round(row.ppl_increase_pct * 100) if math.isfinite(row.ppl_increase_pct) else 0
    )
    variant.tokens_per_second_milli = fixed_point(row.tokens_per_second, 1000)
    variant.quality_gate = row.gate.value
    return VariantFile(path=path, variant=variant)


def ladder_variants(
    source: Path,
    *,
    quantizations: Sequence[str],
    work_dir: Path,
    max_ppl_increase_pct: float,
    warn_only: bool,
    tokenizer_path: Path | None = None,
    progress: Callable[[str], None] | None = None,
) -> tuple[list[VariantFile], LadderResult]:
    """Builds and measures the ladder; returns the source and every variant that passed its gate.

    An ONNX source given as a folder brings its own tokenizer.json unless tokenizer_path
    says otherwise. Raises the ladder's QualityGateError (with the whole table) when a
    variant fails the gate.
    """
    if tokenizer_path is None and source.is_dir() and is_onnx(source) and (source / TOKENIZER_FILE).is_file():
        tokenizer_path = source / TOKENIZER_FILE
    result = build_ladder(
        source,
        quantizations=quantizations,
        out_dir=work_dir,
        max_ppl_increase_pct=max_ppl_increase_pct,
        warn_only=warn_only,
        tokenizer=load_tokenizer(tokenizer_path) if tokenizer_path else None,
        progress=progress,
    )
    kept = [row for row in result.rows if row.gate is not GateStatus.FAIL]
    archives = work_dir / "archives"
    return [row_variant(row, pack_dir=archives, tokenizer_path=tokenizer_path) for row in kept], result
