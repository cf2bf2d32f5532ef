"""The quantization ladder without models: registries, gate, windows, rendering, detection.

The orchestration test swaps the backend registry for a fake that writes small files and
returns preset numbers; the real backends are exercised in tests/integration.
"""

from __future__ import annotations

import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import gguf
import numpy as np
import pytest
from rich.console import Console

from edgefleet.controlplane.build.ladder import (
    EvalConfig,
    EvaluationError,
    GateStatus,
    InvalidSettings,
    LadderResult,
    LadderRow,
    Measurement,
    ModelFormat,
    QualityGateError,
    QuantizedArtifact,
    RuntimeUnavailable,
    Tokenizer,
    UnknownQuantization,
    UnsupportedSource,
    build_ladder,
    default_eval_text,
    detect_format,
    gate_status,
    ladder_table,
    normalize_quantizations,
    parse_quantizations,
    ppl_increase_pct,
    result_from_dict,
    result_to_dict,
    row_from_dict,
    row_to_dict,
)
from edgefleet.controlplane.build.ladder import build as build_module
from edgefleet.controlplane.build.ladder.gguf import FTYPES, ftype_for, read_gguf_header
from edgefleet.controlplane.build.ladder.mlx import MlxBackend
from edgefleet.controlplane.build.ladder.perplexity import perplexity_from, split_windows, window_nll
from edgefleet.controlplane.build.ladder.table import format_size

# --- name registries ---


def test_gguf_registry_names_and_llama_cpp_ftypes() -> None:
    expected = {"q4_0": 2, "q4_1": 3, "q5_0": 8, "q5_1": 9, "q8_0": 7, "q4_k_m": 15, "q5_k_m": 17, "q6_k": 18}
    expected["f16"] = 1
    assert set(FTYPES) == set(expected)
    for name, value in expected.items():
        assert ftype_for(name) == value, name


def test_names_are_case_insensitive_and_deduplicated() -> None:
    assert normalize_quantizations(["Q4_0", "q8_0", " q4_0 "], fmt=ModelFormat.GGUF) == ("q4_0", "q8_0")
    assert normalize_quantizations(["INT8"], fmt=ModelFormat.ONNX) == ("int8",)
    assert normalize_quantizations(["q4", "q8"], fmt=ModelFormat.MLX) == ("q4", "q8")


def test_unknown_name_lists_the_known_ones() -> None:
    with pytest.raises(UnknownQuantization) as caught:
        normalize_quantizations(["q4_0", "q3_xl"], fmt=ModelFormat.GGUF)
    assert caught.value.name == "q3_xl" and "q8_0" in caught.value.known
    assert "q4_k_m" in str(caught.value)
    with pytest.raises(UnknownQuantization):
        normalize_quantizations(["q4_0"], fmt=ModelFormat.ONNX)  # a GGUF name is not an ONNX one


def test_parse_quantizations_splits_cli_values() -> None:
    assert parse_quantizations("q4_0, Q5_1,,q8_0 ") == ("q4_0", "Q5_1", "q8_0")
    assert parse_quantizations("") == ()


# --- gate ---


def test_ppl_increase_is_relative_to_the_source() -> None:
    assert ppl_increase_pct(source=20.0, variant=22.0) == pytest.approx(10.0)
    assert ppl_increase_pct(source=20.0, variant=19.0) == pytest.approx(-5.0)
    assert math.isnan(ppl_increase_pct(source=20.0, variant=math.inf))
    assert math.isnan(ppl_increase_pct(source=0.0, variant=1.0))


@pytest.mark.parametrize(
    ("increase", "warn_only", "expected"),
    [
        (-3.0, False, GateStatus.PASS),
        (10.0, False, GateStatus.PASS),  # the limit itself is allowed
        (10.01, False, GateStatus.FAIL),
        (10.01, True, GateStatus.WARN),
        (math.nan, False, GateStatus.FAIL),  # unmeasurable is never a pass
        (math.nan, True, GateStatus.WARN),
    ],
)
def test_gate_status(increase: float, warn_only: bool, expected: GateStatus) -> None:
    assert gate_status(increase, max_increase_pct=10.0, warn_only=warn_only) is expected


def _row(quantization: str, *, ppl: float, increase: float, gate: GateStatus, size: int = 1000) -> LadderRow:
    return LadderRow(
        format=ModelFormat.GGUF,
        quantization=quantization,
        paths=(Path(f"/models/model.{quantization}.gguf"),),
        size_bytes=size,
        perplexity=ppl,
        ppl_increase_pct=increase,
        tokens_per_second=42.5,
        gate=gate,
        note="n",
        tokens_scored=100,
    )


def _result(*rows: LadderRow, warn_only: bool = False) -> LadderResult:
    return LadderResult(
        source=Path("/models/source.gguf"),
        format=ModelFormat.GGUF,
        rows=rows,
        max_ppl_increase_pct=10.0,
        warn_only=warn_only,
        eval_config=EvalConfig(n_ctx=128, max_windows=2),
        n_threads=1,
    )


def test_quality_gate_error_lists_each_failure_with_numbers() -> None:
    result = _result(
        _row("q4_k_m", ppl=20.0, increase=0.0, gate=GateStatus.SOURCE),
        _row("q4_0", ppl=25.0, increase=25.0, gate=GateStatus.FAIL),
        _row("q8_0", ppl=20.1, increase=0.5, gate=GateStatus.PASS),
        _row("q2_k", ppl=40.0, increase=100.0, gate=GateStatus.FAIL),
    )
    error = QualityGateError(result)
    assert [row.quantization for row in error.failures] == ["q4_0", "q2_k"]
    message = str(error)
    assert "q4_0: perplexity 25.000 vs source 20.000 (+25.00% > +10%)" in message
    assert "q2_k" in message and "q8_0" not in message
    assert error.result is result


# --- orchestration with a fake backend ---


@dataclass
class FakeBackend:
    """Writes tiny files; perplexity by quantization name from `ppl`."""

    ppl: dict[str, float]
    measured: list[str] = field(default_factory=list)

    @property
    def format(self) -> ModelFormat:
        return ModelFormat.GGUF

    def quantization_names(self) -> tuple[str, ...]:
        return ("q4_0", "q8_0")

    def ensure_available(self) -> None:
        return None

    def source_label(self, source: Path) -> str:
        return "f16"

    def variant_path(self, out_dir: Path, quantization: str) -> Path:
        return out_dir / f"model.{quantization}.gguf"

    def files(self, model: Path) -> tuple[Path, ...]:
        return (model,)

    def quantize(self, source: Path, dest: Path, quantization: str, *, n_threads: int) -> QuantizedArtifact:
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(b"GGUF" + b"\0" * (100 if quantization == "q4_0" else 200))
        return QuantizedArtifact(quantization=quantization, paths=(dest,), note="fake")

    def measure(
        self, model: Path, *, text: str, config: EvalConfig, n_threads: int, tokenizer: Tokenizer | None
    ) -> Measurement:
        name = "source" if model.name == "source.gguf" else model.name.split(".")[1]
        self.measured.append(name)
        return Measurement(perplexity=self.ppl[name], tokens_scored=64, windows=1, tokens_per_second=10.0)


@pytest.fixture
def fake_gguf(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, FakeBackend]:
    source = tmp_path / "source.gguf"
    source.write_bytes(b"GGUF" + b"\0" * 400)
    backend = FakeBackend(ppl={"source": 20.0, "q4_0": 23.0, "q8_0": 20.2})
    monkeypatch.setattr(build_module, "BACKENDS", {ModelFormat.GGUF: backend})
    return source, backend


def test_build_ladder_rows_and_gate(fake_gguf: tuple[Path, FakeBackend], tmp_path: Path) -> None:
    source, backend = fake_gguf
    result = build_ladder(
        source, quantizations=["Q8_0", "q4_0"], out_dir=tmp_path / "out", warn_only=True, eval_text="x"
    )
    assert backend.measured == ["source", "q8_0", "q4_0"]
    assert [(r.quantization, r.gate) for r in result.rows] == [
        ("f16", GateStatus.SOURCE),
        ("q8_0", GateStatus.PASS),
        ("q4_0", GateStatus.WARN),
    ]
    source_row, q8_0, q4_0 = result.rows
    assert source_row.size_bytes == 404 and q4_0.size_bytes == 104 and q8_0.size_bytes == 204
    assert q4_0.ppl_increase_pct == pytest.approx(15.0)
    assert result.warnings == (q4_0,)


def test_build_ladder_refuses_unless_warn_only(fake_gguf: tuple[Path, FakeBackend], tmp_path: Path) -> None:
    source, _ = fake_gguf
    with pytest.raises(QualityGateError) as caught:
        build_ladder(source, quantizations=["q4_0", "q8_0"], out_dir=tmp_path / "out", eval_text="x")
    assert [row.quantization for row in caught.value.failures] == ["q4_0"]
    result = build_ladder(
        source, quantizations=["q4_0"], out_dir=tmp_path / "out", max_ppl_increase_pct=20, eval_text="x"
    )
    assert result.rows[1].gate is GateStatus.PASS


def test_build_ladder_validates_before_working(fake_gguf: tuple[Path, FakeBackend], tmp_path: Path) -> None:
    source, backend = fake_gguf
    with pytest.raises(UnknownQuantization):
        build_ladder(source, quantizations=["q4_0", "bogus"], out_dir=tmp_path, eval_text="x")
    with pytest.raises(InvalidSettings, match="max_ppl_increase_pct"):
        build_ladder(source, quantizations=["q4_0"], out_dir=tmp_path, max_ppl_increase_pct=-1)
    with pytest.raises(InvalidSettings, match="empty"):
        build_ladder(source, quantizations=["q4_0"], out_dir=tmp_path, eval_text="  ")
    overwrite = tmp_path / "model.q4_0.gguf"
    overwrite.write_bytes(source.read_bytes())
    with pytest.raises(InvalidSettings, match="overwrite the source"):
        build_ladder(overwrite, quantizations=["q4_0"], out_dir=tmp_path, eval_text="x")
    assert backend.measured == []


# --- format detection ---


def test_detect_format_by_content_suffix_and_folder(tmp_path: Path) -> None:
    gguf_file = tmp_path / "weights.bin"
    gguf_file.write_bytes(b"GGUF\x03\x00\x00\x00")
    mislabelled = tmp_path / "really-gguf.onnx"
    mislabelled.write_bytes(b"GGUF\x03\x00\x00\x00")
    onnx_file = tmp_path / "model.ONNX"
    onnx_file.write_bytes(b"\x08\x08")
    mlx_dir = tmp_path / "hf-model"
    mlx_dir.mkdir()
    (mlx_dir / "config.json").write_text("{}")
    assert detect_format(gguf_file) is ModelFormat.GGUF
    assert detect_format(mislabelled) is ModelFormat.GGUF
    assert detect_format(onnx_file) is ModelFormat.ONNX
    assert detect_format(mlx_dir) is ModelFormat.MLX


@pytest.mark.parametrize("name", ["missing.gguf", "notes.txt", "empty-dir"])
def test_detect_format_refuses_other_things(tmp_path: Path, name: str) -> None:
    if name == "notes.txt":
        (tmp_path / name).write_text("hello")
    elif name == "empty-dir":
        (tmp_path / name).mkdir()
    with pytest.raises(UnsupportedSource):
        detect_format(tmp_path / name)


def test_mlx_without_mlx_lm_is_a_typed_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("edgefleet.controlplane.build.ladder.mlx.importlib.util.find_spec", lambda name: None)
    folder = tmp_path / "hf-model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"torch_dtype": "bfloat16"}))
    with pytest.raises(RuntimeUnavailable, match="mlx is not installed"):
        MlxBackend().ensure_available()
    with pytest.raises(RuntimeUnavailable, match="mlx is not installed"):
        build_ladder(folder, quantizations=["q4"], out_dir=tmp_path / "out")
    assert MlxBackend().source_label(folder) == "bfloat16"


def test_gguf_header_reader_skips_arrays_and_finds_types(tmp_path: Path) -> None:
    path = tmp_path / "tiny.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0)
    writer.add_array("tokenizer.ggml.tokens", ["a", "bb", "ccc"])
    writer.add_array("tokenizer.ggml.scores", [0.0, 1.0, 2.0])
    writer.add_string("general.name", "tiny")
    writer.add_tensor("norm.weight", np.ones(32, dtype=np.float32))
    writer.add_tensor("w", np.zeros((2, 34), dtype=np.uint8), raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    header = read_gguf_header(path)
    assert header.file_type == 7 and header.label == "q8_0"
    assert header.tensor_types == {"F32", "Q8_0"} and header.quantized_types == {"Q8_0"}


# --- perplexity windows ---


def test_windows_are_consecutive_and_the_tail_is_dropped() -> None:
    assert split_windows(list(range(10)), n_ctx=4, max_windows=None) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert split_windows(list(range(10)), n_ctx=4, max_windows=1) == [[0, 1, 2, 3]]
    with pytest.raises(EvaluationError, match="shorter than one window"):
        split_windows([1, 2, 3], n_ctx=4, max_windows=None)


def test_window_nll_scores_only_the_second_half() -> None:
    rng = np.random.default_rng(0)
    window = [3, 1, 4, 1, 5, 2, 6, 5]
    logits = rng.normal(size=(len(window), 8)).astype(np.float32)
    expected = 0.0
    for i in range(4, 7):  # positions n_ctx//2 .. n_ctx-2 predict tokens 5 .. 7
        log_probs = logits[i] - np.log(np.exp(logits[i].astype(np.float64)).sum())
        expected -= log_probs[window[i + 1]]
    nll, count = window_nll(logits, window)
    assert count == 3
    assert nll == pytest.approx(expected)
    assert perplexity_from(nll, count) == pytest.approx(math.exp(expected / 3))


def test_uniform_logits_give_vocabulary_sized_perplexity() -> None:
    nll, count = window_nll(np.zeros((16, 50), dtype=np.float32), list(range(16)))
    assert perplexity_from(nll, count) == pytest.approx(50.0)


def test_non_finite_perplexity_is_an_error() -> None:
    with pytest.raises(EvaluationError):
        perplexity_from(math.inf, 3)
    with pytest.raises(EvaluationError):
        perplexity_from(0.0, 0)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"n_ctx": 4},
        {"max_windows": 0},
        {"gen_tokens": 0},
        {"n_ctx": 32, "prompt_tokens": 16, "gen_tokens": 17},
    ],
)
def test_eval_config_rejects_nonsense(kwargs: dict[str, int]) -> None:
    with pytest.raises(InvalidSettings):
        EvalConfig(**kwargs)


def test_eval_text_ships_with_the_package() -> None:
    text = default_eval_text()
    assert 4000 < len(text.encode("utf-8")) < 20000
    assert text.startswith("It is a truth universally acknowledged")


# --- rendering ---


def test_format_size() -> None:
    assert format_size(512) == "512 B"
    assert format_size(2048) == "2.0 KiB"
    assert format_size(253113024) == "241.4 MiB"
    assert format_size(3 * 1024**3) == "3.0 GiB"


def test_table_shows_every_row_and_its_gate() -> None:
    rows = [
        _row("q4_k_m", ppl=20.0, increase=0.0, gate=GateStatus.SOURCE, size=253113024),
        _row("q4_0", ppl=22.5, increase=12.5, gate=GateStatus.WARN, size=241000000),
        _row("q8_0", ppl=math.nan, increase=math.nan, gate=GateStatus.FAIL),
    ]
    console = Console(record=True, width=200, file=io.StringIO())
    console.print(ladder_table(rows, title="ladder"))
    text = console.export_text()
    for expected in ("q4_k_m", "241.4 MiB", "20.000", "+12.50%", "warn", "fail", "source", "n/a", "42.5"):
        assert expected in text, expected
    assert "model.q4_0.gguf" in text


def test_rows_round_trip_through_json() -> None:
    row = _row("q8_0", ppl=math.nan, increase=math.inf, gate=GateStatus.FAIL)
    data = json.loads(json.dumps(row_to_dict(row), allow_nan=False))
    assert (
        data["perplexity"] is None and data["gate"] == "fail" and data["paths"] == ["/models/model.q8_0.gguf"]
    )
    back = row_from_dict(data)
    assert math.isnan(back.perplexity) and math.isnan(back.ppl_increase_pct)
    assert back.quantization == "q8_0" and back.paths == row.paths and back.gate is GateStatus.FAIL
    finite = _row("q4_0", ppl=21.0, increase=5.0, gate=GateStatus.PASS)
    assert row_from_dict(row_to_dict(finite)) == finite


def test_result_round_trips_through_json() -> None:
    result = _result(
        _row("q4_k_m", ppl=20.0, increase=0.0, gate=GateStatus.SOURCE),
        _row("q4_0", ppl=21.0, increase=5.0, gate=GateStatus.PASS),
    )
    data = json.loads(json.dumps(result_to_dict(result), allow_nan=False))
    assert data["eval"]["n_ctx"] == 128 and len(data["rows"]) == 2
    assert result_from_dict(data) == result
