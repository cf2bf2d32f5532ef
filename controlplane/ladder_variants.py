"""Turns a quantization ladder's rows into bundle variants (the bridge from ladder to bundle)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path

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


def row_variant(row: LadderRow) -> VariantFile:
    """The manifest entry for one ladder row, with the row's measurements."""
    if len(row.paths) != 1:
        raise BundleError(
            f"{row.format.value} variant {row.quantization} is a folder of {len(row.paths)} files; "
            "bundles carry single-file artifacts (GGUF, ONNX)"
        )
    path = row.paths[0]
    quant = row.quantization.lower()
    if row.format is ModelFormat.GGUF:
        variant = gguf_variant(path)
    elif row.format is ModelFormat.ONNX:
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
    return [row_variant(row) for row in kept], result
