"""bench.chunk_dedupe's inputs on a tiny GGUF: a version 2 changes exactly the chosen tensors,
stays a well-formed GGUF of the same layout, and the whole-block selection reaches its share."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
from gguf.quants import quantize

from bench.chunk_inputs import lora_qkv, middle_layers, tensor_bytes, version2
from edgefleet.protos.fleet.chunking import chunk_gguf_tensors, missing_chunks

Q8_0 = gguf.GGMLQuantizationType.Q8_0


def tiny_model(path: Path, blocks: int = 4) -> Path:
    rng = np.random.default_rng(0)
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_string("general.name", "tiny")
    writer.add_tensor(
        "token_embd.weight", quantize(rng.standard_normal((16, 64), dtype=np.float32), Q8_0), raw_dtype=Q8_0
    )
    for block in range(blocks):
        writer.add_tensor(f"blk.{block}.attn_norm.weight", np.ones(64, dtype=np.float32))
        for proj in ("attn_q", "attn_k", "attn_v", "ffn_up"):
            weights = rng.standard_normal((64, 64), dtype=np.float32)
            writer.add_tensor(f"blk.{block}.{proj}.weight", quantize(weights, Q8_0), raw_dtype=Q8_0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def changed_tensors(v1: Path, v2: Path) -> set[str]:
    before = {str(t.name): bytes(np.asarray(t.data).tobytes()) for t in gguf.GGUFReader(v1).tensors}
    after = {str(t.name): bytes(np.asarray(t.data).tobytes()) for t in gguf.GGUFReader(v2).tensors}
    assert before.keys() == after.keys()
    return {name for name in before if before[name] != after[name]}


def test_version2_changes_only_the_selected_tensors(tmp_path: Path) -> None:
    v1 = tiny_model(tmp_path / "v1.gguf")
    v2 = tmp_path / "v2.gguf"
    changed = version2(v1, v2, lora_qkv)
    expected = {f"blk.{b}.{p}.weight" for b in range(4) for p in ("attn_q", "attn_k", "attn_v")}
    assert changed_tensors(v1, v2) == expected
    assert changed == sum(n for name, n in tensor_bytes(v1).items() if name in expected)
    assert v2.stat().st_size == v1.stat().st_size
    assert gguf.GGUFReader(v2).data_offset == gguf.GGUFReader(v1).data_offset
    fetched = missing_chunks(chunk_gguf_tensors(v1), chunk_gguf_tensors(v2))
    assert sum(c.length for c in fetched) >= changed
    assert not list(tmp_path.glob(".*.partial"))


def test_middle_layers_take_whole_blocks_up_to_the_share(tmp_path: Path) -> None:
    v1 = tiny_model(tmp_path / "v1.gguf", blocks=8)
    select = middle_layers(v1, share=0.2)
    chosen = {name.split(".")[1] for name in tensor_bytes(v1) if select(name)}
    chosen_bytes = sum(n for name, n in tensor_bytes(v1).items() if select(name))
    assert chosen and chosen_bytes >= 0.2 * v1.stat().st_size
    # Whole blocks only, starting in the middle.
    assert "4" in chosen
    assert all(select(f"blk.{b}.attn_norm.weight") for b in map(int, chosen))
    assert not select("token_embd.weight")
