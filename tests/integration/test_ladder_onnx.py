"""The INT8 ladder on a small ONNX causal LM built with onnx.helper (no model download), and
its variants shipped as serving folders that the agent's ONNX runtime loads.

The model (:func:`tests.onnx_models.build_bigram_lm`) is a byte-level bigram language model
fitted to the evaluation text itself: the embedding and output projection are a rank-128
SVD factorisation of the text's (barely smoothed) bigram log-probabilities, plus a small MLP
and a causal running-context branch (CumSum + LayerNorm) with small random weights. Because
it sits near the maximum-likelihood fit for that very text, quantization noise raises its
perplexity a little rather than by chance lowering it (with heavier smoothing it could go
either way), which makes the tight-gate checks deterministic.
"""

from __future__ import annotations

import json
import math
import tarfile
from collections.abc import Sequence
from pathlib import Path

import onnx
import pytest
from onnx import TensorProto
from rich.console import Console

from edgefleet.controlplane.build.ladder import (
    EvalConfig,
    GateStatus,
    LadderResult,
    MissingTokenizer,
    ModelFormat,
    QualityGateError,
    build_ladder,
    default_eval_text,
    result_table,
)
from edgefleet.controlplane.build.ladder.variants import ladder_variants, row_variant
from edgefleet.protos.fleet.v1 import common_pb2
from tests.onnx_models import BIGRAM_FFN, BIGRAM_HIDDEN, build_bigram_lm, write_byte_tokenizer

pytestmark = pytest.mark.integration

HIDDEN = BIGRAM_HIDDEN
FFN = BIGRAM_FFN
EVAL = EvalConfig(n_ctx=256, prompt_tokens=16, gen_tokens=32)


def byte_tokenizer(text: str) -> Sequence[int]:
    return list(text.encode("utf-8"))


@pytest.fixture(scope="module")
def source_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("onnx-source") / "byte-lm.onnx"
    build_bigram_lm(path, default_eval_text())
    return path


@pytest.fixture(scope="module")
def ladder(source_model: Path, tmp_path_factory: pytest.TempPathFactory) -> LadderResult:
    result = build_ladder(
        source_model,
        quantizations=["int8"],
        out_dir=tmp_path_factory.mktemp("onnx-ladder"),
        tokenizer=byte_tokenizer,
        eval_config=EVAL,
    )
    Console(width=180).print(result_table(result))
    return result


def test_int8_ladder_shrinks_and_keeps_quality(ladder: LadderResult, source_model: Path) -> None:
    assert ladder.format is ModelFormat.ONNX
    source, int8 = ladder.rows
    assert source.gate is GateStatus.SOURCE and source.quantization == "fp32"
    assert source.paths == (source_model,)
    assert int8.quantization == "int8" and int8.gate is GateStatus.PASS
    assert int8.paths[0].is_file() and int8.size_bytes == int8.paths[0].stat().st_size
    assert int8.size_bytes < 0.4 * source.size_bytes
    # a bigram model of English bytes: far better than uniform over 256 bytes
    assert math.isfinite(source.perplexity) and 1.0 < source.perplexity < 30.0
    assert math.isfinite(int8.perplexity)
    assert 0.0 < int8.ppl_increase_pct < 5.0
    assert int8.ppl_increase_pct == pytest.approx((int8.perplexity / source.perplexity - 1) * 100)
    assert source.tokens_per_second > 0 and int8.tokens_per_second > 0
    assert source.tokens_scored == int8.tokens_scored == (len(default_eval_text()) // 256) * 127


def test_int8_graph_has_quantized_matmuls(ladder: LadderResult) -> None:
    model = onnx.load(str(ladder.rows[1].paths[0]))
    op_types = {node.op_type for node in model.graph.node}
    assert op_types & {"MatMulInteger", "DynamicQuantizeMatMul"}, op_types
    int8_weights = [t for t in model.graph.initializer if t.data_type == TensorProto.INT8]
    assert sum(math.prod(t.dims) for t in int8_weights) >= HIDDEN * FFN * 2


def test_tight_gate_refuses_the_variant(source_model: Path, tmp_path: Path) -> None:
    with pytest.raises(QualityGateError) as caught:
        build_ladder(
            source_model,
            quantizations=["int8"],
            out_dir=tmp_path,
            max_ppl_increase_pct=0.0001,
            tokenizer=byte_tokenizer,
            eval_config=EVAL,
        )
    error = caught.value
    assert [row.quantization for row in error.failures] == ["int8"]
    assert error.failures[0].gate is GateStatus.FAIL
    assert error.failures[0].ppl_increase_pct > 0.0001
    assert error.result.rows[0].gate is GateStatus.SOURCE
    assert "int8" in str(error) and "0.0001%" in str(error)


def test_warn_only_marks_the_variant(source_model: Path, tmp_path: Path) -> None:
    result = build_ladder(
        source_model,
        quantizations=["int8"],
        out_dir=tmp_path,
        max_ppl_increase_pct=0.0001,
        warn_only=True,
        tokenizer=byte_tokenizer,
        eval_config=EVAL,
    )
    assert [row.gate for row in result.rows] == [GateStatus.SOURCE, GateStatus.WARN]
    assert result.warnings == (result.rows[1],)


def test_onnx_needs_a_tokenizer(source_model: Path, tmp_path: Path) -> None:
    with pytest.raises(MissingTokenizer):
        build_ladder(source_model, quantizations=["int8"], out_dir=tmp_path, eval_config=EVAL)


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where the operator keeps the model's tokenizer and Hugging Face configs."""
    folder = tmp_path_factory.mktemp("onnx-tokenizer")
    write_byte_tokenizer(folder)
    (folder / "config.json").write_text(json.dumps({"max_position_embeddings": 256}), encoding="utf-8")
    (folder / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 256}), encoding="utf-8")
    (folder / "README.md").write_text("not part of a serving folder", encoding="utf-8")
    return folder


def test_onnx_rows_become_servable_folder_archives(
    ladder: LadderResult, tokenizer_dir: Path, tmp_path: Path
) -> None:
    from edgefleet.agent.runtimes import SamplingParams, load_runtime
    from edgefleet.agent.update.archive import extract_archive

    int8 = ladder.variants[0]
    tokenizer = tokenizer_dir / "tokenizer.json"
    first = row_variant(int8, pack_dir=tmp_path / "a", tokenizer_path=tokenizer)
    again = row_variant(int8, pack_dir=tmp_path / "b", tokenizer_path=tokenizer)
    assert first.path.read_bytes() == again.path.read_bytes()  # same folder, same artifact hash
    variant = first.variant
    assert variant.id == "onnx-int8" and variant.artifact == "model.int8.onnx.tar"
    assert variant.format == common_pb2.MODEL_FORMAT_ONNX and variant.quantization == "INT8"
    assert variant.size_bytes == first.path.stat().st_size
    assert variant.min_ram_bytes == 2 * variant.size_bytes + 256 * 1024 * 1024
    assert variant.context_length == 256 and not variant.has_chat_template
    assert variant.perplexity_milli == round(int8.perplexity * 1000)
    assert variant.quality_gate == "pass"
    with tarfile.open(first.path) as tar:
        assert sorted(tar.getnames()) == [
            "config.json",
            "model.onnx",
            "tokenizer.json",
            "tokenizer_config.json",
        ]
    assert [p.name for p in (tmp_path / "a").iterdir()] == ["model.int8.onnx.tar"]  # no staging left

    unpacked = tmp_path / "device" / "models" / "int8"
    extract_archive(first.path, unpacked, max_total_bytes=variant.size_bytes)
    assert (unpacked / "model.onnx").read_bytes() == int8.paths[0].read_bytes()
    runtime = load_runtime(
        fmt=common_pb2.MODEL_FORMAT_ONNX, model_path=unpacked, model_id="byte-lm", n_ctx=512
    )
    try:
        assert runtime.describe().n_ctx == 256
        runtime.smoke_test()
        result = runtime.complete("It is a truth universally", SamplingParams(max_tokens=16, temperature=0.0))
        assert result.completion_tokens == 16 and result.text.strip()
    finally:
        runtime.unload()


def test_onnx_row_without_a_tokenizer_is_refused(ladder: LadderResult, tmp_path: Path) -> None:
    from edgefleet.controlplane.build.bundles import BundleError

    with pytest.raises(BundleError, match=r"tokenizer\.json"):
        row_variant(ladder.variants[0], pack_dir=tmp_path)


def test_folder_source_ships_its_own_tokenizer_and_template(source_model: Path, tmp_path: Path) -> None:
    folder = tmp_path / "byte-lm"
    folder.mkdir()
    (folder / "model.onnx").write_bytes(source_model.read_bytes())
    write_byte_tokenizer(folder)
    template = "{% for m in messages %}{{ m['content'] }}\n{% endfor %}"
    (folder / "tokenizer_config.json").write_text(json.dumps({"chat_template": template}), encoding="utf-8")
    variants, result = ladder_variants(
        folder,
        quantizations=["int8"],
        work_dir=tmp_path / "work",
        max_ppl_increase_pct=10.0,
        warn_only=False,
    )
    assert result.format is ModelFormat.ONNX
    assert result.source_row.paths == (folder / "model.onnx",)
    assert [v.variant.id for v in variants] == ["onnx-fp32", "onnx-int8"]
    for built in variants:
        assert built.variant.has_chat_template
        with tarfile.open(built.path) as tar:
            assert sorted(tar.getnames()) == ["model.onnx", "tokenizer.json", "tokenizer_config.json"]
