"""Builds the quantization ladder: one source model in, measured and gated variants out.

The bundle builder calls :func:`build_ladder` before it signs anything, so a variant that
lost too much quality never reaches a device unless the operator explicitly asked to only
be warned. Every number in the result is measured on this machine in this run, with the
same text and settings for the source and its variants, so only the differences between
rows are meaningful, not the absolute perplexities.

Work runs on the calling thread, one model at a time: the tokens/s column must not be
skewed by a second model competing for the cores, and llama.cpp's OpenMP build is ~3x
slower when called from a thread other than the one that loaded the model.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from types import MappingProxyType

from edgefleet.controlplane.build.ladder.gguf import GgufBackend, is_gguf
from edgefleet.controlplane.build.ladder.mlx import MlxBackend, is_mlx_folder
from edgefleet.controlplane.build.ladder.onnx import OnnxBackend, is_onnx
from edgefleet.controlplane.build.ladder.perplexity import default_eval_text, default_threads
from edgefleet.controlplane.build.ladder.types import (
    EvalConfig,
    GateStatus,
    InvalidSettings,
    LadderBackend,
    LadderResult,
    LadderRow,
    ModelFormat,
    QualityGateError,
    Tokenizer,
    UnknownQuantization,
    UnsupportedSource,
)

Progress = Callable[[str], None]

# Tried in order: the GGUF magic is checked before the .onnx suffix, so a mislabelled
# GGUF file is still recognised by its content.
FORMAT_DETECTORS: tuple[tuple[ModelFormat, Callable[[Path], bool]], ...] = (
    (ModelFormat.GGUF, is_gguf),
    (ModelFormat.ONNX, is_onnx),
    (ModelFormat.MLX, is_mlx_folder),
)

BACKENDS: MappingProxyType[ModelFormat, LadderBackend] = MappingProxyType(
    {
        ModelFormat.GGUF: GgufBackend(),
        ModelFormat.ONNX: OnnxBackend(),
        ModelFormat.MLX: MlxBackend(),
    }
)


def detect_format(source: Path) -> ModelFormat:
    """GGUF file (by magic), ONNX file or folder (by suffix) or MLX / Hugging Face folder (config.json)."""
    if not source.exists():
        raise UnsupportedSource(f"{source} does not exist")
    for fmt, matches in FORMAT_DETECTORS:
        if matches(source):
            return fmt
    raise UnsupportedSource(
        f"{source} is not a GGUF file, an .onnx file (or a folder with one) "
        "or a folder with config.json (MLX / Hugging Face)"
    )


def parse_quantizations(spec: str) -> tuple[str, ...]:
    """Splits a CLI value such as ``"q4_0, Q8_0"`` into names (validated later, per format)."""
    return tuple(part.strip() for part in spec.split(",") if part.strip())


def normalize_quantizations(names: Sequence[str], *, fmt: ModelFormat) -> tuple[str, ...]:
    """Lowercased, de-duplicated (first wins) names, all known to the format's backend."""
    known = BACKENDS[fmt].quantization_names()
    result: list[str] = []
    for raw in names:
        name = raw.strip().lower()
        if name not in known:
            raise UnknownQuantization(raw, fmt=fmt, known=known)
        if name not in result:
            result.append(name)
    return tuple(result)


def ppl_increase_pct(*, source: float, variant: float) -> float:
    """How much worse the variant's perplexity is, in percent of the source's (negative: better)."""
    if not (math.isfinite(source) and math.isfinite(variant)) or source <= 0:
        return math.nan
    return (variant - source) / source * 100.0


def gate_status(increase_pct: float, *, max_increase_pct: float, warn_only: bool) -> GateStatus:
    """PASS within the limit; over it (or unmeasurable) FAIL, or WARN when the operator allows."""
    if math.isfinite(increase_pct) and increase_pct <= max_increase_pct:
        return GateStatus.PASS
    return GateStatus.WARN if warn_only else GateStatus.FAIL


def size_of(paths: Sequence[Path]) -> int:
    return sum(path.stat().st_size for path in paths)


def build_ladder(
    source: Path,
    *,
    quantizations: Sequence[str],
    out_dir: Path,
    max_ppl_increase_pct: float = 10.0,
    warn_only: bool = False,
    eval_text: str | None = None,
    n_threads: int | None = None,
    eval_config: EvalConfig | None = None,
    tokenizer: Tokenizer | None = None,
    progress: Progress | None = None,
) -> LadderResult:
    """Quantizes `source` into every requested variant under out_dir, measures all, gates them.

    eval_text defaults to the text shipped with the package; n_threads to half the logical
    CPUs (see :func:`edgefleet.controlplane.build.ladder.perplexity.default_threads`);
    tokenizer is required for ONNX sources only. Raises QualityGateError (carrying the
    full result) when a variant's perplexity rose more than max_ppl_increase_pct over the
    source's, unless warn_only, in which case such rows are marked ``warn``. The variant
    files stay in out_dir either way; a refused build must not be bundled.
    """
    if not math.isfinite(max_ppl_increase_pct) or max_ppl_increase_pct < 0:
        raise InvalidSettings(
            f"max_ppl_increase_pct must be a finite number >= 0, got {max_ppl_increase_pct}"
        )
    fmt = detect_format(source)
    backend = BACKENDS[fmt]
    backend.ensure_available()
    names = normalize_quantizations(quantizations, fmt=fmt)
    text = default_eval_text() if eval_text is None else eval_text
    if not text.strip():
        raise InvalidSettings("the evaluation text is empty")
    config = eval_config or EvalConfig()
    if n_threads is not None and n_threads < 1:
        raise InvalidSettings(f"n_threads must be at least 1, got {n_threads}")
    threads = n_threads or default_threads()
    destinations = {name: backend.variant_path(out_dir, name) for name in names}
    for name, dest in destinations.items():
        if dest.resolve() == source.resolve():
            raise InvalidSettings(
                f"the {name} variant would overwrite the source {source}; choose another out_dir"
            )
    say = progress or _silent

    say(f"measuring source {source.name}")
    reference = backend.measure(source, text=text, config=config, n_threads=threads, tokenizer=tokenizer)
    source_files = backend.files(source)
    rows = [
        LadderRow(
            format=fmt,
            quantization=backend.source_label(source),
            paths=source_files,
            size_bytes=size_of(source_files),
            perplexity=reference.perplexity,
            ppl_increase_pct=0.0,
            tokens_per_second=reference.tokens_per_second,
            gate=GateStatus.SOURCE,
            tokens_scored=reference.tokens_scored,
        )
    ]
    for name, dest in destinations.items():
        say(f"quantizing {name}")
        # 0 = every hardware thread: quantizing is independent per tensor, unlike decoding.
        artifact = backend.quantize(source, dest, name, n_threads=n_threads or 0)
        say(f"measuring {name}")
        measured = backend.measure(dest, text=text, config=config, n_threads=threads, tokenizer=tokenizer)
        increase = ppl_increase_pct(source=reference.perplexity, variant=measured.perplexity)
        rows.append(
            LadderRow(
                format=fmt,
                quantization=name,
                paths=artifact.paths,
                size_bytes=size_of(artifact.paths),
                perplexity=measured.perplexity,
                ppl_increase_pct=increase,
                tokens_per_second=measured.tokens_per_second,
                gate=gate_status(increase, max_increase_pct=max_ppl_increase_pct, warn_only=warn_only),
                note=artifact.note,
                tokens_scored=measured.tokens_scored,
            )
        )
    result = LadderResult(
        source=source,
        format=fmt,
        rows=tuple(rows),
        max_ppl_increase_pct=max_ppl_increase_pct,
        warn_only=warn_only,
        eval_config=config,
        n_threads=threads,
    )
    if any(row.gate is GateStatus.FAIL for row in result.rows):
        raise QualityGateError(result)
    return result


def _silent(_message: str) -> None:
    return None
