"""The artifact chunker: exact coverage, stable CDC boundaries, tensor alignment, typed refusals."""

from __future__ import annotations

import hashlib
import random
from pathlib import Path

import gguf
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgefleet.protos.fleet.chunking import (
    KIB,
    CdcParams,
    Chunk,
    ChunkLimits,
    InvalidChunkParameters,
    MalformedArtifact,
    MalformedChunkList,
    Strategy,
    TooManyChunks,
    UnreadableArtifact,
    check_chunk_list,
    chunk_cdc,
    chunk_file,
    chunk_gguf_tensors,
    missing_chunks,
)
from edgefleet.protos.fleet.chunking_gguf import tensor_spans
from edgefleet.protos.fleet.release import Refusal, TransientFailure

SMALL = CdcParams(min_size=1 * KIB, avg_size=4 * KIB, max_size=16 * KIB)


def random_bytes(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


def assert_covers(path: Path, chunks: list[Chunk]) -> None:
    data = path.read_bytes()
    check_chunk_list(chunks, len(data))
    for chunk in chunks:
        assert hashlib.sha256(data[chunk.offset : chunk.end]).hexdigest() == chunk.sha256


def write_gguf(path: Path, tensors: dict[str, np.ndarray], *, alignment: int | None = None) -> Path:
    writer = gguf.GGUFWriter(str(path), "llama")
    if alignment is not None:
        writer.add_custom_alignment(alignment)
    writer.add_string("general.name", "tiny")
    writer.add_array("tokenizer.ggml.tokens", ["a", "bb", "ccc"])
    for name, array in tensors.items():
        writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def tiny_tensors(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "token_embd.weight": rng.standard_normal((64, 48), dtype=np.float32),
        "blk.0.attn_norm.weight": np.ones(48, dtype=np.float32),
        "blk.0.attn_q.weight": rng.standard_normal((48, 48), dtype=np.float32),
        "blk.0.odd.weight": rng.standard_normal(7, dtype=np.float32),  # 28 bytes: padding follows
        "output_norm.weight": np.ones(48, dtype=np.float32),
    }


# --- CDC --------------------------------------------------------------------------------------


def test_cdc_chunks_cover_the_file_exactly(tmp_path: Path) -> None:
    path = tmp_path / "blob"
    path.write_bytes(random_bytes(300 * KIB + 17, seed=1))
    chunks = chunk_cdc(path, params=SMALL)
    assert_covers(path, chunks)
    assert all(c.length <= SMALL.max_size for c in chunks)
    assert all(c.length >= SMALL.min_size for c in chunks[:-1])


def test_cdc_boundaries_survive_an_insertion(tmp_path: Path) -> None:
    original = random_bytes(400 * KIB, seed=2)
    edited = original[: 150 * KIB] + b"inserted bytes shift everything after them" + original[150 * KIB :]
    (tmp_path / "a").write_bytes(original)
    (tmp_path / "b").write_bytes(edited)
    before = chunk_cdc(tmp_path / "a", params=SMALL)
    after = chunk_cdc(tmp_path / "b", params=SMALL)
    after_edit = [c for c in before if c.offset > 150 * KIB]
    reappear = {c.sha256 for c in after} & {c.sha256 for c in after_edit}
    assert len(reappear) >= len(after_edit) - 2, "more than the chunks next to the edit changed"
    fetched = sum(c.length for c in missing_chunks(before, after))
    assert fetched <= 3 * SMALL.max_size


@settings(max_examples=25, deadline=None)
@given(length=st.integers(min_value=1, max_value=120 * KIB), seed=st.integers(min_value=0, max_value=2**16))
def test_cdc_chunks_any_length_within_their_sizes(
    tmp_path_factory: pytest.TempPathFactory, length: int, seed: int
) -> None:
    path = tmp_path_factory.mktemp("cdc") / "blob"
    path.write_bytes(random_bytes(length, seed))
    chunks = chunk_cdc(path, params=SMALL)
    assert_covers(path, chunks)
    assert all(c.length <= SMALL.max_size for c in chunks)
    assert all(c.length >= SMALL.min_size for c in chunks[:-1])


def test_cdc_same_bytes_same_chunks(tmp_path: Path) -> None:
    path = tmp_path / "blob"
    path.write_bytes(random_bytes(100 * KIB, seed=3))
    assert chunk_cdc(path, params=SMALL) == chunk_cdc(path, params=SMALL)


def test_cdc_empty_file_has_no_chunks(tmp_path: Path) -> None:
    path = tmp_path / "empty"
    path.write_bytes(b"")
    assert chunk_cdc(path, params=SMALL) == []
    check_chunk_list([], 0)


def test_cdc_refuses_too_many_chunks(tmp_path: Path) -> None:
    path = tmp_path / "blob"
    path.write_bytes(random_bytes(200 * KIB, seed=4))
    with pytest.raises(TooManyChunks):
        chunk_cdc(path, params=SMALL, limits=ChunkLimits(max_chunks=5))


@pytest.mark.parametrize(
    "params",
    [
        CdcParams(min_size=8 * KIB, avg_size=4 * KIB, max_size=16 * KIB),  # min > avg
        CdcParams(min_size=1 * KIB, avg_size=4 * KIB, max_size=32 * 1024 * KIB),  # max over 16 MiB
        CdcParams(min_size=16, avg_size=4 * KIB, max_size=16 * KIB),  # min under pyfastcdc's bound
    ],
)
def test_cdc_refuses_bad_sizes(tmp_path: Path, params: CdcParams) -> None:
    path = tmp_path / "blob"
    path.write_bytes(b"x" * 100)
    with pytest.raises(InvalidChunkParameters):
        chunk_cdc(path, params=params)


def test_cdc_max_chunk_may_not_exceed_the_limit(tmp_path: Path) -> None:
    path = tmp_path / "blob"
    path.write_bytes(b"x" * 100)
    with pytest.raises(InvalidChunkParameters):
        chunk_cdc(path, params=SMALL, limits=ChunkLimits(max_chunk_bytes=8 * KIB))


def test_missing_file_is_unreadable_not_a_refusal(tmp_path: Path) -> None:
    for strategy in Strategy:
        with pytest.raises(UnreadableArtifact) as caught:
            chunk_file(tmp_path / "absent", strategy)
        assert isinstance(caught.value, TransientFailure) and not isinstance(caught.value, Refusal)


# --- GGUF tensor-aligned ----------------------------------------------------------------------


def test_tensor_chunks_line_up_with_tensor_offsets(tmp_path: Path) -> None:
    path = write_gguf(tmp_path / "tiny.gguf", tiny_tensors())
    chunks = chunk_gguf_tensors(path)
    assert_covers(path, chunks)
    reader = gguf.GGUFReader(path)
    tensors = sorted(reader.tensors, key=lambda t: int(t.data_offset))
    assert chunks[0].offset == 0 and chunks[0].length == reader.data_offset  # the header
    assert [c.offset for c in chunks[1:]] == [int(t.data_offset) for t in tensors]
    for chunk, tensor in zip(chunks[1:], tensors, strict=True):
        # Each chunk holds its tensor's bytes and at most the alignment padding after them.
        assert int(tensor.n_bytes) <= chunk.length < int(tensor.n_bytes) + reader.alignment


def test_a_changed_tensor_changes_only_its_own_chunk(tmp_path: Path) -> None:
    tensors = tiny_tensors()
    v1 = write_gguf(tmp_path / "v1.gguf", tensors)
    tensors["blk.0.attn_q.weight"] = tensors["blk.0.attn_q.weight"] * 1.5
    v2 = write_gguf(tmp_path / "v2.gguf", tensors)
    fetch = missing_chunks(chunk_gguf_tensors(v1), chunk_gguf_tensors(v2))
    q = next(t for t in gguf.GGUFReader(v2).tensors if t.name == "blk.0.attn_q.weight")
    assert [c.offset for c in fetch] == [int(q.data_offset)]


def test_large_tensors_split_at_the_piece_size(tmp_path: Path) -> None:
    path = write_gguf(tmp_path / "tiny.gguf", tiny_tensors())
    spans = tensor_spans(path, ChunkLimits(), piece_bytes=1000)
    assert all(length <= 1000 for _, length in spans)
    embd = next(t for t in gguf.GGUFReader(path).tensors if t.name == "token_embd.weight")
    offsets = {offset for offset, _ in spans}
    assert {int(embd.data_offset) + k * 1000 for k in range(int(embd.n_bytes) // 1000)} <= offsets


def test_custom_alignment_is_followed(tmp_path: Path) -> None:
    path = write_gguf(tmp_path / "tiny.gguf", tiny_tensors(), alignment=64)
    chunks = chunk_gguf_tensors(path)
    assert_covers(path, chunks)
    assert all(c.offset % 64 == 0 for c in chunks)


def test_not_a_gguf_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "model.gguf"
    path.write_bytes(random_bytes(4 * KIB, seed=5))
    with pytest.raises(MalformedArtifact) as caught:
        chunk_gguf_tensors(path)
    assert isinstance(caught.value, Refusal)


@pytest.mark.parametrize("keep", [3, 20, 200, -100, -1])
def test_truncated_gguf_is_refused(tmp_path: Path, keep: int) -> None:
    whole = write_gguf(tmp_path / "whole.gguf", tiny_tensors()).read_bytes()
    path = tmp_path / "cut.gguf"
    path.write_bytes(whole[:keep])
    with pytest.raises(MalformedArtifact):
        chunk_gguf_tensors(path)


def test_corrupt_tensor_table_is_refused(tmp_path: Path) -> None:
    path = write_gguf(tmp_path / "tiny.gguf", tiny_tensors())
    reader = gguf.GGUFReader(path)
    last = max(reader.tensors, key=lambda t: t.field.offset)
    entry_end = last.field.offset + sum(int(part.nbytes) for part in last.field.parts)
    del reader, last
    data = bytearray(path.read_bytes())
    # A tensor-table entry ends with its data offset (u64): point the last one past the file.
    data[entry_end - 8 : entry_end] = (1 << 40).to_bytes(8, "little")
    corrupt = tmp_path / "corrupt.gguf"
    corrupt.write_bytes(bytes(data))
    with pytest.raises(MalformedArtifact):
        chunk_gguf_tensors(corrupt)


def test_absurd_counts_are_refused_before_parsing(tmp_path: Path) -> None:
    path = tmp_path / "huge.gguf"
    path.write_bytes(
        b"GGUF" + (3).to_bytes(4, "little") + (10**12).to_bytes(8, "little") + bytes(8) + bytes(64)
    )
    with pytest.raises(TooManyChunks):
        chunk_gguf_tensors(path)
    path.write_bytes(
        b"GGUF" + (3).to_bytes(4, "little") + bytes(8) + (10**9).to_bytes(8, "little") + bytes(64)
    )
    with pytest.raises(MalformedArtifact):
        chunk_gguf_tensors(path)


def test_tensor_chunk_count_is_limited(tmp_path: Path) -> None:
    path = write_gguf(tmp_path / "tiny.gguf", tiny_tensors())
    with pytest.raises(TooManyChunks):
        chunk_gguf_tensors(path, limits=ChunkLimits(max_chunks=3))


# --- chunk lists ------------------------------------------------------------------------------

SHA = "0" * 64


@pytest.mark.parametrize(
    ("chunks", "length"),
    [
        ([Chunk(0, 10, SHA), Chunk(11, 5, SHA)], 16),  # a gap
        ([Chunk(0, 10, SHA), Chunk(9, 5, SHA)], 14),  # an overlap
        ([Chunk(0, 10, SHA)], 12),  # short of the end
        ([Chunk(0, 0, SHA)], 0),  # an empty chunk
        ([Chunk(0, 10, "ABC")], 10),  # not a sha256
        ([], 5),  # nothing for something
    ],
)
def test_malformed_chunk_lists_are_refused(chunks: list[Chunk], length: int) -> None:
    with pytest.raises(MalformedChunkList):
        check_chunk_list(chunks, length)


def test_chunk_list_limits() -> None:
    chunks = [Chunk(i * 10, 10, SHA) for i in range(4)]
    check_chunk_list(chunks, 40)
    with pytest.raises(MalformedChunkList):
        check_chunk_list(chunks, 40, ChunkLimits(max_chunks=3))
    with pytest.raises(MalformedChunkList):
        check_chunk_list(chunks, 40, ChunkLimits(max_chunk_bytes=9))


def test_missing_chunks_fetches_each_new_hash_once() -> None:
    a, b, c = ("a" * 64, "b" * 64, "c" * 64)
    held = [Chunk(0, 4, a)]
    wanted = [Chunk(0, 4, b), Chunk(4, 4, a), Chunk(8, 4, b), Chunk(12, 4, c)]
    assert missing_chunks(held, wanted) == [Chunk(0, 4, b), Chunk(12, 4, c)]
