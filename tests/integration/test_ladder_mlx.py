"""The MLX ladder for real: mlx-lm converts a tiny Llama folder built on the spot (no model download).

The source is the tiny random Llama folder of ``tests.mlx_models`` (a ~0.5M-parameter
LlamaForCausalLM with a 512-token BPE tokenizer trained on the evaluation text). Random
weights make the perplexity close to the vocabulary size, so the test checks that the
numbers are finite and that quantization shrinks the folder, not that quality holds. mlx
runs on the CPU here (``mlx[cpu]`` on Linux); on Apple silicon the same test uses the GPU.
"""

from __future__ import annotations

import math
import tarfile
from importlib.util import find_spec
from pathlib import Path

import pytest

from edgefleet.controlplane.build.ladder import (
    EvalConfig,
    GateStatus,
    LadderResult,
    ModelFormat,
    build_ladder,
)
from edgefleet.controlplane.build.ladder.variants import row_variant
from edgefleet.protos.fleet.v1 import common_pb2
from tests.mlx_models import build_llama

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(find_spec("mlx_lm") is None, reason="needs mlx-lm (pip install 'mlx[cpu]' mlx-lm)"),
]

EVAL = EvalConfig(n_ctx=128, max_windows=4, prompt_tokens=16, gen_tokens=32)


@pytest.fixture(scope="module")
def ladder(tmp_path_factory: pytest.TempPathFactory) -> LadderResult:
    root = tmp_path_factory.mktemp("mlx")
    build_llama(root / "tiny-llama")
    return build_ladder(
        root / "tiny-llama",
        quantizations=["q4", "q8"],
        out_dir=root / "ladder",
        max_ppl_increase_pct=1000.0,  # random weights: quality is not the point here
        eval_config=EVAL,
    )


def test_mlx_ladder_shrinks_and_measures(ladder: LadderResult) -> None:
    for row in ladder.rows:
        print(
            f"mlx {row.quantization}: {row.size_bytes} bytes, perplexity {row.perplexity:.3f} "
            f"({row.ppl_increase_pct:+.2f}%), {row.tokens_per_second:.1f} tok/s, {row.gate}"
        )
    assert ladder.format is ModelFormat.MLX
    source, q4, q8 = ladder.rows
    assert source.quantization == "float32" and source.gate is GateStatus.SOURCE
    assert [q4.quantization, q8.quantization] == ["q4", "q8"]
    assert q4.size_bytes < q8.size_bytes < source.size_bytes
    for row in ladder.rows:
        assert math.isfinite(row.perplexity) and row.perplexity > 1
        assert math.isfinite(row.tokens_per_second) and row.tokens_per_second > 0
        assert row.tokens_scored > 0
    assert all(row.gate is GateStatus.PASS for row in ladder.variants)


def test_mlx_rows_become_tar_variants(ladder: LadderResult, tmp_path: Path) -> None:
    from edgefleet.agent.update.archive import extract_archive

    q4 = ladder.variants[0]
    first = row_variant(q4, pack_dir=tmp_path / "a")
    again = row_variant(q4, pack_dir=tmp_path / "b")
    assert first.path.read_bytes() == again.path.read_bytes()  # same folder, same artifact hash
    variant = first.variant
    assert variant.id == "mlx-q4" and variant.artifact == "model.q4.mlx.tar"
    assert variant.format == common_pb2.MODEL_FORMAT_MLX and variant.quantization == "Q4"
    assert variant.size_bytes == first.path.stat().st_size
    assert variant.min_ram_bytes == 2 * variant.size_bytes + 256 * 1024 * 1024
    assert variant.context_length == 1024
    assert variant.perplexity_milli == round(q4.perplexity * 1000)
    assert variant.tokens_per_second_milli > 0 and variant.quality_gate == "pass"
    with tarfile.open(first.path) as tar:
        assert "config.json" in tar.getnames() and "model.safetensors" in tar.getnames()

    unpacked = tmp_path / "device" / "models" / "q4"
    extract_archive(first.path, unpacked, max_total_bytes=variant.size_bytes)
    for original in q4.paths:
        folder = original.parent
        assert (unpacked / original.relative_to(folder)).read_bytes() == original.read_bytes()

    from mlx_lm import load

    net, tokenizer = load(str(unpacked))[:2]
    assert tokenizer.encode("the model") and net is not None
