"""Turns a quantization ladder's rows into bundle variants (the bridge from ladder to bundle).

GGUF and ONNX rows are single files and ship as they are. An MLX row is a folder (config,
safetensors, tokenizer), so it ships as one deterministic tar built by
:func:`controlplane.archive_pack.pack_folder`; the device verifies the tar's hash like any
artifact and only then unpacks it with ``agent.archive.extract_archive``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path

from controlplane.archive_pack import pack_folder
from controlplane.bundles import BundleError, VariantFile, gguf_variant
from controlplane.ladder import GateStatus, LadderResult, LadderRow, ModelFormat, Tokenizer, build_ladder
from protos.fleet.v1 import bundle_pb2, common_pb2

RUNTIME_HEADROOM_BYTES = 256 * 1024 * 1024


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
    size = archive.stat().st_size
    context, has_template = folder_metadata(folder)
    variant = bundle_pb2.Variant(
        id=f"mlx-{quant}",
        format=common_pb2.MODEL_FORMAT_MLX,
        quantization=row.quantization.upper(),
        artifact=artifact,
        size_bytes=size,
        # The tar is unpacked next to itself (2x on disk); mlx loads the weights into
        # unified memory and needs a KV cache and compute buffers on top.
        min_ram_bytes=2 * size + RUNTIME_HEADROOM_BYTES,
        context_length=context,
        has_chat_template=has_template,
    )
    return archive, variant


def row_variant(row: LadderRow, *, pack_dir: Path | None = None) -> VariantFile:
    """The manifest entry for one ladder row, with the row's measurements.

    An MLX (folder) row is packed into a tar under pack_dir (default: beside the folder).
    """
    quant = row.quantization.lower()
    if row.format is ModelFormat.MLX:
        path, variant = mlx_variant(row, pack_dir=pack_dir)
    elif len(row.paths) != 1:
        raise BundleError(
            f"{row.format.value} variant {row.quantization} is a folder of {len(row.paths)} files; "
            "only MLX folders are packed into archives"
        )
    elif row.format is ModelFormat.GGUF:
        path = row.paths[0]
        variant = gguf_variant(path)
    elif row.format is ModelFormat.ONNX:
        path = row.paths[0]
        size = path.stat().st_size
        variant = bundle_pb2.Variant(
            id=f"onnx-{quant}",
            format=common_pb2.MODEL_FORMAT_ONNX,
            quantization=row.quantization.upper(),
            artifact=f"model.{quant}.onnx",
            size_bytes=size,
            min_ram_bytes=2 * size + RUNTIME_HEADROOM_BYTES,
        )
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

    Raises the ladder's QualityGateError (with the whole table) when a variant fails the gate.
    """
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
    return [row_variant(row, pack_dir=archives) for row in kept], result
