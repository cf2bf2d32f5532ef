"""LoRA adapter files checked against their base before llama.cpp sees them (tiny GGUFs written
with the gguf package's writer), the GGUF header reader under them, and per-request refusals."""

from __future__ import annotations

import struct
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from gguf import GGUFWriter

from bench.lora_build import build_lora, mismatched_lora
from edgefleet.agent.runtimes.base import (
    Capability,
    FieldNotSupported,
    LoraRequest,
    RuntimeDescription,
    SamplingParams,
    require_support,
)
from edgefleet.agent.runtimes.gguf_tensors import GgufFormatError, read_layout
from edgefleet.agent.runtimes.llama_adapters import check_lora_file
from edgefleet.agent.runtimes.lora import (
    LoraFileInvalid,
    LoraInfo,
    LoraMismatch,
    LoraNameRefused,
    check_name,
)
from edgefleet.protos.fleet.v1 import common_pb2

N_IN, N_OUT, VOCAB = 16, 8, 32
Tensors = dict[str, np.ndarray]


def write_gguf(
    path: Path, tensors: Tensors, *, arch: str = "llama", kind: str = "adapter", lora: bool = True
) -> Path:
    writer = GGUFWriter(path, arch)
    writer.add_type(kind)
    if lora:
        writer.add_string("adapter.type", "lora")
        writer.add_float32("adapter.lora.alpha", 4.0)
    writer.add_array("tokenizer.ggml.tokens", ["a", "bb", "ccc"])  # skipped, not kept
    for name, array in tensors.items():
        writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture
def base(tmp_path: Path) -> Path:
    """A two-layer 'llama' with one projection per layer and a token embedding."""
    tensors = {
        "token_embd.weight": np.zeros((VOCAB, N_IN), np.float32),  # ggml [N_IN, VOCAB]
        "blk.0.attn_q.weight": np.zeros((N_OUT, N_IN), np.float32),  # ggml [N_IN, N_OUT]
        "blk.1.attn_q.weight": np.zeros((N_OUT, N_IN), np.float32),
        "blk.0.attn_norm.weight": np.ones(N_IN, np.float32),
    }
    return write_gguf(tmp_path / "base.gguf", tensors, kind="model", lora=False)


def pair(target: str, rank: int = 4, n_in: int = N_IN, n_out: int = N_OUT) -> Tensors:
    return {
        f"{target}.lora_a": np.ones((rank, n_in), np.float32),
        f"{target}.lora_b": np.ones((n_out, rank), np.float32),
    }


def check(path: Path, base: Path, max_bytes: int = 1 << 20) -> LoraInfo:
    return check_lora_file(path, read_layout(base), name="x", max_bytes=max_bytes)


def test_layout_keeps_scalars_and_shapes(base: Path) -> None:
    layout = read_layout(base)
    assert layout.string("general.architecture") == "llama"
    assert layout.string("general.type") == "model"
    assert "tokenizer.ggml.tokens" not in layout.metadata  # arrays are skipped
    assert layout.tensors["blk.0.attn_q.weight"].shape == (N_IN, N_OUT)  # ggml order
    assert layout.tensors["token_embd.weight"].shape == (N_IN, VOCAB)
    assert layout.data_start % 32 == 0 and layout.file_size == base.stat().st_size


def test_a_fitting_adapter_is_described(tmp_path: Path, base: Path) -> None:
    tensors = pair("blk.0.attn_q.weight") | pair("blk.1.attn_q.weight", rank=2)
    tensors["blk.0.attn_norm.weight"] = np.ones(N_IN, np.float32)  # norms are skipped, as llama.cpp does
    path = write_gguf(tmp_path / "ok.gguf", tensors)
    info = check_lora_file(path, read_layout(base), name="ok", max_bytes=1 << 20)
    assert (info.name, info.rank, info.alpha, info.tensors, info.architecture) == ("ok", 4, 4.0, 2, "llama")
    assert info.size_bytes == path.stat().st_size


def test_the_token_embedding_is_stored_flipped(tmp_path: Path, base: Path) -> None:
    """llama.cpp's rule for token_embd: A is [rank, n_vocab] and B [rank, n_embd] in ggml order."""
    flipped = {
        "token_embd.weight.lora_a": np.ones((VOCAB, 4), np.float32),
        "token_embd.weight.lora_b": np.ones((N_IN, 4), np.float32),
    }
    assert check(write_gguf(tmp_path / "embd.gguf", flipped), base).rank == 4
    with pytest.raises(LoraMismatch):
        check(write_gguf(tmp_path / "unflipped.gguf", pair("token_embd.weight", n_out=VOCAB)), base)


@pytest.mark.parametrize(
    ("make", "error"),
    [
        (lambda p: write_gguf(p, pair("blk.0.attn_q.weight"), kind="model"), LoraFileInvalid),
        (lambda p: write_gguf(p, pair("blk.0.attn_q.weight"), lora=False), LoraFileInvalid),
        (lambda p: write_gguf(p, pair("blk.0.attn_q.weight"), arch="gemma3"), LoraMismatch),
        (lambda p: write_gguf(p, pair("blk.7.attn_q.weight")), LoraMismatch),  # no such weight
        (lambda p: write_gguf(p, pair("blk.0.attn_q.weight", n_in=N_IN + 1)), LoraMismatch),
        (lambda p: write_gguf(p, pair("blk.0.attn_q.weight", n_out=N_OUT * 2)), LoraMismatch),
        (
            lambda p: write_gguf(p, {"blk.0.attn_q.weight.lora_a": np.ones((4, N_IN), np.float32)}),
            LoraFileInvalid,
        ),
        (
            lambda p: write_gguf(p, {"blk.0.attn_q.weight": np.ones((N_OUT, N_IN), np.float32)}),
            LoraFileInvalid,
        ),
        (lambda p: write_gguf(p, {}), LoraFileInvalid),  # no tensors at all
        (
            lambda p: write_gguf(
                p, {k: v.astype(np.int8) for k, v in pair("blk.0.attn_q.weight").items()}
            ),  # a ggml type the check does not know the size of
            LoraFileInvalid,
        ),
    ],
)
def test_refusals_are_typed(
    tmp_path: Path, base: Path, make: Callable[[Path], Path], error: type[Exception]
) -> None:
    with pytest.raises(error):
        check(make(tmp_path / "adapter.gguf"), base)


def test_rank_mismatch_between_a_and_b_is_refused(tmp_path: Path, base: Path) -> None:
    tensors = {
        "blk.0.attn_q.weight.lora_a": np.ones((4, N_IN), np.float32),
        "blk.0.attn_q.weight.lora_b": np.ones((N_OUT, 3), np.float32),
    }
    with pytest.raises(LoraMismatch) as refused:
        check(write_gguf(tmp_path / "rank.gguf", tensors), base)
    assert refused.value.tensor == "blk.0.attn_q.weight"


def test_truncated_and_oversized_files_are_refused(tmp_path: Path, base: Path) -> None:
    good = write_gguf(tmp_path / "good.gguf", pair("blk.0.attn_q.weight"))
    check(good, base)
    data = good.read_bytes()
    for cut in (8, 40, len(data) - 4):
        truncated = tmp_path / f"cut{cut}.gguf"
        truncated.write_bytes(data[:cut])
        with pytest.raises(LoraFileInvalid):
            check(truncated, base)
    with pytest.raises(LoraFileInvalid, match="limit"):
        check(good, base, max_bytes=len(data) - 1)
    with pytest.raises(LoraFileInvalid):
        check(tmp_path / "missing.gguf", base)


def test_hostile_counts_are_bounded_by_the_file(tmp_path: Path) -> None:
    """A header claiming more tensors or a longer string than the file holds fails fast."""
    huge = tmp_path / "huge.gguf"
    huge.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 1 << 60, 0))
    with pytest.raises(GgufFormatError, match="exceeds"):
        read_layout(huge)
    long_key = tmp_path / "key.gguf"
    long_key.write_bytes(b"GGUF" + struct.pack("<IQQQ", 3, 0, 1, 1 << 40))
    with pytest.raises(GgufFormatError):
        read_layout(long_key)
    for content in (b"", b"GGML" + bytes(20), b"GGUF" + struct.pack("<I", 9) + bytes(16)):
        bad = tmp_path / "bad.gguf"
        bad.write_bytes(content)
        with pytest.raises(GgufFormatError):
            read_layout(bad)


def test_the_fixture_builder_writes_what_the_check_accepts(tmp_path: Path, base: Path) -> None:
    built = build_lora(base, tmp_path / "built.gguf", rank=2, targets=("attn_q",), f16=True)
    info = check_lora_file(built, read_layout(base), name="built", max_bytes=1 << 20)
    assert (info.rank, info.tensors, info.alpha) == (2, 2, 2.0)
    with pytest.raises(LoraMismatch):
        check(mismatched_lora(base, tmp_path / "misfit.gguf"), base)


@pytest.mark.parametrize("name", ["style", "a", "v1.2_x-y", "A" * 64])
def test_names_accepted(name: str) -> None:
    check_name(name)


@pytest.mark.parametrize("name", ["", "-a", ".a", "a/b", "a:b", "a b", "é", "A" * 65])
def test_names_refused(name: str) -> None:
    with pytest.raises(LoraNameRefused):
        check_name(name)


def _description(*capabilities: Capability) -> RuntimeDescription:
    return RuntimeDescription(
        runtime="test",
        model_id="m",
        model_path=Path("m"),
        n_ctx=64,
        n_threads=1,
        gpu_offload=False,
        format=common_pb2.MODEL_FORMAT_GGUF,
        capabilities=frozenset(capabilities),
    )


def test_a_lora_request_needs_the_capability_and_a_sane_scale() -> None:
    with_lora = SamplingParams(lora=LoraRequest("style"))
    with pytest.raises(FieldNotSupported) as refused:
        require_support(_description(Capability.COMPLETIONS), with_lora)
    assert refused.value.param == "lora"
    capable = _description(Capability.COMPLETIONS, Capability.LORA)
    require_support(capable, with_lora)
    require_support(capable, SamplingParams(lora=LoraRequest("style", 0.0)))
    for scale in (float("nan"), float("inf"), 8.5, -9.0):
        with pytest.raises(FieldNotSupported):
            require_support(capable, SamplingParams(lora=LoraRequest("style", scale)))
