"""MLX variants through mlx-lm's ``convert``, for Apple-silicon devices.

mlx only runs on Apple silicon (and, slowly, on Linux CPUs when built for it); the control
plane usually runs elsewhere, so mlx-lm is optional: every entry point checks for it with
``importlib.util.find_spec`` and raises :class:`RuntimeUnavailable` rather than failing
on import. The source is a local Hugging Face-style folder (config.json, safetensors,
tokenizer files); nothing is fetched from a model hub.

Measurement follows :mod:`edgefleet.controlplane.build.ladder.perplexity`: windows of ``n_ctx`` tokens of
the tokenizer's encoding of the text, second half scored; speed is greedy
``mlx_lm.generate.generate_step`` (with its KV cache), timed from the first generated token
so the prompt is excluded.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

from edgefleet.controlplane.build.ladder.perplexity import perplexity_from, split_windows, window_nll
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

# Ladder name -> bits per weight of mlx's affine group quantization.
BITS: MappingProxyType[str, int] = MappingProxyType({"q3": 3, "q4": 4, "q5": 5, "q6": 6, "q8": 8})
GROUP_SIZE = 64  # mlx-lm's default; smaller groups cost size for a little quality

_UNAVAILABLE = "mlx is not installed (mlx_lm not found): install edgefleet[mlx] on Apple silicon"


def ensure_mlx() -> None:
    """Raises RuntimeUnavailable unless mlx_lm can be imported."""
    if importlib.util.find_spec("mlx_lm") is None:
        raise RuntimeUnavailable(_UNAVAILABLE)


def is_mlx_folder(path: Path) -> bool:
    return path.is_dir() and (path / "config.json").is_file()


def folder_files(model: Path) -> tuple[Path, ...]:
    return tuple(sorted(p for p in model.rglob("*") if p.is_file()))


def folder_precision(model: Path) -> str:
    """The folder's precision: q<bits> when mlx-quantized, else its config's dtype (e.g. bfloat16)."""
    try:
        config = json.loads((model / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UnsupportedSource(f"{model}/config.json is unreadable: {exc}") from exc
    quantization = config.get("quantization")
    if isinstance(quantization, dict) and isinstance(quantization.get("bits"), int):
        return f"q{quantization['bits']}"
    dtype = config.get("torch_dtype") or config.get("dtype")
    return str(dtype) if dtype else "unknown"


def quantize_mlx(source: Path, dest: Path, quantization: str) -> QuantizedArtifact:
    """Converts the folder with ``mlx_lm.convert(quantize=True, q_bits=...)`` into dest."""
    ensure_mlx()
    from mlx_lm.convert import convert

    bits = BITS[quantization]
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging_root = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    staging = staging_root / dest.name  # convert() refuses an existing directory
    try:
        try:
            convert(str(source), mlx_path=str(staging), quantize=True, q_bits=bits, q_group_size=GROUP_SIZE)
        except Exception as exc:  # mlx-lm raises ValueError, OSError and mlx runtime errors
            raise QuantizationFailed(
                f"mlx_lm convert({source.name} -> {quantization}) failed: {exc}"
            ) from exc
        if not is_mlx_folder(staging):
            raise QuantizationFailed(f"mlx_lm convert wrote no config.json for {quantization}")
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(staging, dest)
    finally:
        shutil.rmtree(staging_root, ignore_errors=True)
    note = f"affine {bits}-bit, group size {GROUP_SIZE}"
    if folder_precision(source).startswith("q"):
        note += f" (from an already quantized {folder_precision(source)} source)"
    return QuantizedArtifact(quantization=quantization, paths=folder_files(dest), note=note)


def measure_mlx(model: Path, *, text: str, config: EvalConfig) -> Measurement:
    """Perplexity and greedy tokens/s with mlx-lm (see the module docstring)."""
    ensure_mlx()
    import mlx.core as mx
    import numpy as np
    from mlx_lm import load
    from mlx_lm.generate import generate_step

    loaded = load(str(model))
    net, tokenizer = loaded[0], loaded[1]
    tokens = [int(t) for t in tokenizer.encode(text)]
    windows = split_windows(tokens, n_ctx=config.n_ctx, max_windows=config.max_windows)
    nll_sum, count = 0.0, 0
    for window in windows:
        logits = net(mx.array(window)[None])[0].astype(mx.float32)
        nll, scored = window_nll(np.array(logits), window)
        nll_sum += nll
        count += scored
    prompt = mx.array(tokens[: config.prompt_tokens])
    generated, started = 0, 0.0
    for _token, _logprobs in generate_step(prompt, net, max_tokens=config.gen_tokens):
        generated += 1
        if generated == 1:
            started = time.perf_counter()
    elapsed = time.perf_counter() - started
    speed = (generated - 1) / elapsed if generated > 1 and elapsed > 0 else math.nan
    return Measurement(
        perplexity=perplexity_from(nll_sum, count),
        tokens_scored=count,
        windows=len(windows),
        tokens_per_second=speed,
    )


@dataclass(frozen=True, slots=True)
class MlxBackend:
    """The ladder backend for MLX / Hugging Face folders (see :class:`LadderBackend`)."""

    @property
    def format(self) -> ModelFormat:
        return ModelFormat.MLX

    def quantization_names(self) -> tuple[str, ...]:
        return tuple(BITS)

    def ensure_available(self) -> None:
        ensure_mlx()

    def source_label(self, source: Path) -> str:
        return folder_precision(source)

    def variant_path(self, out_dir: Path, quantization: str) -> Path:
        return out_dir / f"mlx-{quantization}"

    def files(self, model: Path) -> tuple[Path, ...]:
        return folder_files(model)

    def quantize(self, source: Path, dest: Path, quantization: str, *, n_threads: int) -> QuantizedArtifact:
        return quantize_mlx(source, dest, quantization)

    def measure(
        self, model: Path, *, text: str, config: EvalConfig, n_threads: int, tokenizer: Tokenizer | None
    ) -> Measurement:
        if tokenizer is not None:
            raise InvalidSettings("MLX folders carry their own tokenizer; do not pass one")
        return measure_mlx(model, text=text, config=config)
