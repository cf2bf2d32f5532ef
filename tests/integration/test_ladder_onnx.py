"""The INT8 ladder on a small ONNX causal LM built here with onnx.helper (no model download).

The model is a byte-level bigram language model fitted to the evaluation text itself: the
embedding and output projection are a rank-128 SVD factorisation of the text's (barely
smoothed) bigram log-probabilities, plus a small MLP and a causal running-context branch
(CumSum + LayerNorm) with small random weights. Because it sits near the maximum-likelihood
fit for that very text, quantization noise raises its perplexity a little rather than by
chance lowering it (with heavier smoothing it could go either way), which makes the
tight-gate checks deterministic.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from rich.console import Console

from controlplane.ladder import (
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

pytestmark = pytest.mark.integration

VOCAB = 256  # bytes
HIDDEN = 128
FFN = 512
EVAL = EvalConfig(n_ctx=256, prompt_tokens=16, gen_tokens=32)


def byte_tokenizer(text: str) -> Sequence[int]:
    return list(text.encode("utf-8"))


def bigram_log_probs(text: str) -> np.ndarray:
    data = np.frombuffer(text.encode("utf-8"), dtype=np.uint8)
    counts = np.full((VOCAB, VOCAB), 0.001)
    np.add.at(counts, (data[:-1], data[1:]), 1.0)
    return np.log(counts / counts.sum(axis=1, keepdims=True))


def build_model(path: Path, text: str) -> None:
    rng = np.random.default_rng(1234)
    u, s, vt = np.linalg.svd(bigram_log_probs(text))
    root = np.sqrt(s[:HIDDEN])
    weights = {
        "embedding": u[:, :HIDDEN] * root,
        "w1": rng.normal(0, 0.02, (HIDDEN, FFN)),
        "b1": np.zeros(FFN),
        "w2": rng.normal(0, 0.02, (FFN, HIDDEN)),
        "b2": np.zeros(HIDDEN),
        "ln_scale": np.ones(HIDDEN),
        "ln_bias": np.zeros(HIDDEN),
        "w_ctx": rng.normal(0, 0.02, (HIDDEN, HIDDEN)),
        "w_out": root[:, None] * vt[:HIDDEN],
        "b_out": np.zeros(VOCAB),
    }
    initializers = [numpy_helper.from_array(v.astype(np.float32), name=k) for k, v in weights.items()]
    initializers.append(numpy_helper.from_array(np.array(1, dtype=np.int64), name="seq_axis"))
    nodes = [
        helper.make_node("Gather", ["embedding", "input_ids"], ["x0"]),
        # feed-forward block with a residual connection
        helper.make_node("MatMul", ["x0", "w1"], ["ff1"]),
        helper.make_node("Add", ["ff1", "b1"], ["ff1b"]),
        helper.make_node("Relu", ["ff1b"], ["ff1r"]),
        helper.make_node("MatMul", ["ff1r", "w2"], ["ff2"]),
        helper.make_node("Add", ["ff2", "b2"], ["ff2b"]),
        helper.make_node("Add", ["x0", "ff2b"], ["x1"]),
        # causal context: a normalised running sum over the positions seen so far
        helper.make_node("CumSum", ["x1", "seq_axis"], ["running"]),
        helper.make_node("LayerNormalization", ["running", "ln_scale", "ln_bias"], ["ctx"], axis=-1),
        helper.make_node("MatMul", ["ctx", "w_ctx"], ["ctx_proj"]),
        helper.make_node("Add", ["x1", "ctx_proj"], ["x2"]),
        helper.make_node("MatMul", ["x2", "w_out"], ["proj"]),
        helper.make_node("Add", ["proj", "b_out"], ["logits"]),
    ]
    graph = helper.make_graph(
        nodes,
        "byte-bigram-lm",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "seq", VOCAB])],
        initializer=initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


@pytest.fixture(scope="module")
def source_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("onnx-source") / "byte-lm.onnx"
    build_model(path, default_eval_text())
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
