"""Values and errors of the quantization ladder, shared by every backend.

Everything here is a frozen dataclass or an exception: backends return values, the
orchestrator (:mod:`edgefleet.controlplane.build.ladder.build`) combines them, and the CLI renders them
(:mod:`edgefleet.controlplane.build.ladder.table`), so no layer can mutate what another measured.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

Tokenizer = Callable[[str], Sequence[int]]
"""Turns text into token ids; ONNX graphs carry no tokenizer, so the caller supplies one."""


class ModelFormat(enum.StrEnum):
    GGUF = "gguf"
    ONNX = "onnx"
    MLX = "mlx"


class GateStatus(enum.StrEnum):
    """What the quality gate decided for a row (the source row is the reference, not gated)."""

    SOURCE = "source"
    PASS = "pass"
    WARN = "warn"  # over the limit, kept because the operator asked for warn-only
    FAIL = "fail"  # over the limit: the build is refused


class LadderError(Exception):
    """Base of the ladder's errors: the build cannot produce or trust a variant."""


class InvalidSettings(LadderError, ValueError):
    """A ladder setting is out of range (limits, window sizes, output paths, empty text)."""


class UnsupportedSource(LadderError):
    """The source is neither a GGUF file, an ONNX file nor an MLX (config.json) folder."""


class UnknownQuantization(LadderError):
    """A requested quantization name is not in the backend's registry."""

    def __init__(self, name: str, *, fmt: ModelFormat, known: Sequence[str]) -> None:
        super().__init__(f"unknown {fmt} quantization {name!r}; choose from: {', '.join(known)}")
        self.name = name
        self.format = fmt
        self.known = tuple(known)


class RuntimeUnavailable(LadderError):
    """The library a backend needs (llama-cpp-python, onnxruntime, mlx-lm) is not installed."""


class QuantizationFailed(LadderError):
    """The backend's quantizer returned an error or wrote nothing."""


class EvaluationError(LadderError):
    """Perplexity or speed could not be measured (text too short, unusable graph, NaN)."""


class MissingTokenizer(LadderError):
    """An ONNX model must be measured with a tokenizer and none was given."""


@dataclass(frozen=True, slots=True)
class EvalConfig:
    """How a model is measured; the same config is used for the source and every variant.

    n_ctx: tokens per perplexity window (only the second half of each window is scored).
    max_windows: stop after this many windows (None: as many as the text fills).
    prompt_tokens / gen_tokens: the speed probe decodes gen_tokens greedily after a prompt
    of prompt_tokens taken from the evaluation text.
    """

    n_ctx: int = 512
    max_windows: int | None = None
    prompt_tokens: int = 16
    gen_tokens: int = 32

    def __post_init__(self) -> None:
        if self.n_ctx < 8:
            raise InvalidSettings(f"n_ctx must be at least 8 tokens, got {self.n_ctx}")
        if self.max_windows is not None and self.max_windows < 1:
            raise InvalidSettings(f"max_windows must be at least 1, got {self.max_windows}")
        if self.prompt_tokens < 1 or self.gen_tokens < 1:
            raise InvalidSettings("prompt_tokens and gen_tokens must be at least 1")
        if self.prompt_tokens + self.gen_tokens > self.n_ctx:
            total = self.prompt_tokens + self.gen_tokens
            raise InvalidSettings(f"prompt_tokens + gen_tokens ({total}) exceed n_ctx ({self.n_ctx})")


@dataclass(frozen=True, slots=True)
class Measurement:
    """Quality and speed of one model on the evaluation text, on this machine."""

    perplexity: float
    tokens_scored: int  # tokens whose negative log-likelihood entered the perplexity
    windows: int
    tokens_per_second: float  # greedy decode, prompt processing excluded


@dataclass(frozen=True, slots=True)
class QuantizedArtifact:
    """What a backend's quantizer wrote."""

    quantization: str
    paths: tuple[Path, ...]
    note: str = ""  # e.g. that a quantized source had to be requantized


@dataclass(frozen=True, slots=True)
class LadderRow:
    """One rung of the ladder: the source or a variant, with its numbers and gate decision."""

    format: ModelFormat
    quantization: str
    paths: tuple[Path, ...]
    size_bytes: int
    perplexity: float
    ppl_increase_pct: float  # relative to the source row; 0.0 for the source itself
    tokens_per_second: float
    gate: GateStatus
    note: str = ""
    tokens_scored: int = 0  # evaluation tokens behind the perplexity

    @property
    def is_source(self) -> bool:
        return self.gate is GateStatus.SOURCE


@dataclass(frozen=True, slots=True)
class LadderResult:
    """The measured ladder: the source row first, then one row per requested variant."""

    source: Path
    format: ModelFormat
    rows: tuple[LadderRow, ...]
    max_ppl_increase_pct: float
    warn_only: bool
    eval_config: EvalConfig
    n_threads: int

    @property
    def source_row(self) -> LadderRow:
        return self.rows[0]

    @property
    def variants(self) -> tuple[LadderRow, ...]:
        return self.rows[1:]

    @property
    def warnings(self) -> tuple[LadderRow, ...]:
        return tuple(row for row in self.rows if row.gate is GateStatus.WARN)


class QualityGateError(LadderError):
    """Variants lost more quality than allowed; the whole result rides along for display."""

    def __init__(self, result: LadderResult) -> None:
        self.result = result
        self.failures = tuple(row for row in result.rows if row.gate is GateStatus.FAIL)
        source = result.source_row
        lines = [
            f"{row.quantization}: perplexity {row.perplexity:.3f} vs source {source.perplexity:.3f} "
            f"({_signed_pct(row.ppl_increase_pct)} > +{result.max_ppl_increase_pct:g}%)"
            for row in self.failures
        ]
        super().__init__(
            f"{len(self.failures)} variant(s) over the perplexity limit "
            f"(use warn-only to keep them): " + "; ".join(lines)
        )


def _signed_pct(value: float) -> str:
    return f"{value:+.2f}%" if math.isfinite(value) else str(value)


class LadderBackend(Protocol):
    """One model format: its quantization registry, quantizer and meter.

    Backends import their runtime lazily, so a control plane without mlx or onnxruntime
    still builds GGUF ladders.
    """

    @property
    def format(self) -> ModelFormat: ...

    def quantization_names(self) -> tuple[str, ...]:
        """The names this backend accepts, lowercase."""
        ...

    def ensure_available(self) -> None:
        """Raises RuntimeUnavailable before any work starts if the runtime is missing."""
        ...

    def source_label(self, source: Path) -> str:
        """A short name for the source's own precision (e.g. "q4_k_m", "fp32")."""
        ...

    def variant_path(self, out_dir: Path, quantization: str) -> Path:
        """Where the variant for `quantization` goes inside out_dir."""
        ...

    def files(self, model: Path) -> tuple[Path, ...]:
        """Every file that makes up the model (its size is their sum)."""
        ...

    def quantize(self, source: Path, dest: Path, quantization: str, *, n_threads: int) -> QuantizedArtifact:
        """Writes the variant atomically to dest; n_threads 0 lets the backend use every core."""
        ...

    def measure(
        self, model: Path, *, text: str, config: EvalConfig, n_threads: int, tokenizer: Tokenizer | None
    ) -> Measurement:
        """Perplexity on `text` and greedy tokens/s, on the calling thread."""
        ...
