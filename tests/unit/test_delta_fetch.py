"""Chunked downloads: the plan (held vs missing, resume, repeats), the device's chunk index, and
the store assembling an artifact from held and fetched chunks against a fake control plane."""

from __future__ import annotations

import hashlib
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from edgefleet.agent.update.artifacts import ArtifactStore
from edgefleet.agent.update.delta_fetch import ChunkHashMismatch, verified_prefix
from edgefleet.agent.update.delta_plan import Copy, Fetch, HeldChunk, plan_chunks
from edgefleet.protos.fleet.chunk_list import ChunkList
from edgefleet.protos.fleet.chunking import Chunk
from edgefleet.protos.fleet.release import ArtifactInfo, ArtifactVerifier
from edgefleet.protos.fleet.v1 import device_pb2

PIECE = 1000


def chunks_of(data: bytes, size: int = PIECE) -> tuple[Chunk, ...]:
    return tuple(
        Chunk(o, len(data[o : o + size]), hashlib.sha256(data[o : o + size]).hexdigest())
        for o in range(0, len(data), size)
    )


def info_of(data: bytes, size: int = PIECE) -> ArtifactInfo:
    digest = hashlib.sha256(data).hexdigest()
    return ArtifactInfo("m/2/model.gguf", len(data), digest, chunks=ChunkList("cdc", chunks_of(data, size)))


def kinds(steps: tuple[Copy | Fetch, ...]) -> list[str]:
    return [
        f"copy@{s.chunk.offset}" if isinstance(s, Copy) else f"fetch@{s.offset}+{s.length}" for s in steps
    ]


def test_held_chunks_are_copied_and_runs_of_missing_ones_fetched_in_one_range() -> None:
    wanted = [Chunk(i * 10, 10, f"{i:064x}") for i in range(6)]
    held = {wanted[2].sha256: HeldChunk(Path("/a"), 0, 10), wanted[5].sha256: HeldChunk(Path("/a"), 90, 10)}
    plan = plan_chunks(wanted, held)
    assert kinds(plan.steps) == ["fetch@0+20", "copy@20", "fetch@30+20", "copy@50"]
    assert (plan.fetch_bytes, plan.copy_bytes) == (40, 20)


def test_a_resumed_plan_starts_after_the_done_chunks_and_copies_repeats_from_the_part_file() -> None:
    same = "ab" * 32
    wanted = [Chunk(0, 10, same), Chunk(10, 10, "cd" * 32), Chunk(20, 10, same), Chunk(30, 10, "ef" * 32)]
    plan = plan_chunks(wanted, {}, done=2)
    assert kinds(plan.steps) == ["copy@20", "fetch@30+10"]
    first = plan.steps[0]
    assert isinstance(first, Copy) and first.source == HeldChunk(None, 0, 10)  # None: the part file


def test_a_held_chunk_of_another_length_is_fetched_and_long_runs_are_split() -> None:
    wanted = [Chunk(i * 10, 10, f"{i:064x}") for i in range(5)]
    plan = plan_chunks(wanted, {wanted[0].sha256: HeldChunk(Path("/a"), 0, 11)}, max_fetch_bytes=20)
    assert kinds(plan.steps) == ["fetch@0+20", "fetch@20+20", "fetch@40+10"]


def test_verified_prefix_keeps_matching_chunks_and_cuts_a_torn_or_wrong_one(tmp_path: Path) -> None:
    data = os.urandom(3500)
    info = info_of(data)
    assert info.chunks is not None
    part = tmp_path / "x.part"
    part.write_bytes(data[:2000] + b"\0" * 1000 + data[3000:3200])  # chunk 2 wrong, chunk 3 torn
    verifier = ArtifactVerifier(info)
    assert verified_prefix(part, info.chunks.chunks, verifier) == 2
    assert part.read_bytes() == data[:2000] and verifier.received == 2000


class Server:
    """Serves ``data`` as FetchArtifact does, honouring offset and length; records each range."""

    def __init__(
        self, data: bytes, *, piece: int = 700, corrupt_at: int | None = None, ranges: bool = True
    ) -> None:
        self.data, self.piece, self.corrupt_at, self.honours_length = data, piece, corrupt_at, ranges
        self.ranges: list[tuple[int, int]] = []

    def FetchArtifact(self, request: device_pb2.FetchArtifactRequest) -> Stream:
        self.ranges.append((request.offset, request.length))
        end = request.offset + request.length if request.length and self.honours_length else len(self.data)
        return Stream(self, request.offset, end)


class Stream:
    def __init__(self, server: Server, start: int, end: int) -> None:
        self.server, self.start, self.end = server, start, end

    def cancel(self) -> bool:
        return True

    async def __aiter__(self) -> AsyncIterator[device_pb2.ArtifactChunk]:  # type: ignore[misc]
        data = bytearray(self.server.data)
        if self.server.corrupt_at is not None:
            data[self.server.corrupt_at] ^= 0xFF
        for offset in range(self.start, self.end, self.server.piece):
            piece = bytes(data[offset : min(offset + self.server.piece, self.end)])
            yield device_pb2.ArtifactChunk(offset=offset, data=piece, total_length=len(data))


def store_holding(tmp_path: Path, v1: bytes) -> ArtifactStore:
    """A store with ``v1`` installed from a release that signed its chunk list."""
    store = ArtifactStore(tmp_path / "artifacts", tmp_path / "downloads")
    info = info_of(v1)
    store.artifact_dir.mkdir(parents=True)
    store.path(info.sha256).write_bytes(v1)
    assert info.chunks is not None
    store.chunk_index.record(info.sha256, info.chunks)
    return store


async def test_only_the_chunks_the_device_lacks_are_fetched(tmp_path: Path) -> None:
    v1 = os.urandom(10 * PIECE)
    v2 = v1[:3000] + os.urandom(PIECE) + v1[4000:]
    store = store_holding(tmp_path, v1)
    server = Server(v2)
    path = await store.fetch(server, info_of(v2))  # type: ignore[arg-type]
    assert path.read_bytes() == v2
    assert server.ranges == [(3000, PIECE)]
    assert (store.counters.fetched_bytes, store.counters.copied_bytes) == (PIECE, 9 * PIECE)
    assert store.chunk_index.has(info_of(v2).sha256)  # the next release can copy from it too


async def test_a_held_chunk_that_no_longer_matches_is_fetched_instead(tmp_path: Path) -> None:
    v1 = os.urandom(4 * PIECE)
    store = store_holding(tmp_path, v1)
    damaged = bytearray(v1)
    damaged[1500] ^= 0xFF
    held = store.path(info_of(v1).sha256)
    held.write_bytes(bytes(damaged))
    v2 = v1[:2000] + os.urandom(2 * PIECE)
    server = Server(v2)
    assert (await store.fetch(server, info_of(v2))).read_bytes() == v2  # type: ignore[arg-type]
    assert server.ranges == [(1000, PIECE), (2000, 2 * PIECE)]
    assert store.counters.refetched_chunks == 1


async def test_a_fetched_chunk_that_does_not_hash_is_refused_and_the_verified_prefix_kept(
    tmp_path: Path,
) -> None:
    v2 = os.urandom(4 * PIECE)
    store = ArtifactStore(tmp_path / "artifacts", tmp_path / "downloads")
    with pytest.raises(ChunkHashMismatch, match="do not hash to the chunk's signed sha256"):
        await store.fetch(Server(v2, corrupt_at=2500), info_of(v2))  # type: ignore[arg-type]
    assert store.part_path(info_of(v2).sha256).read_bytes() == v2[:2000]
    # A later attempt resumes at chunk 2: the chunks written and verified are not fetched again.
    server = Server(v2)
    assert (await store.fetch(server, info_of(v2))).read_bytes() == v2  # type: ignore[arg-type]
    assert server.ranges == [(2000, 2 * PIECE)]


async def test_a_corrupt_index_file_costs_a_fetch_not_a_wrong_byte(tmp_path: Path) -> None:
    v1 = os.urandom(3 * PIECE)
    store = store_holding(tmp_path, v1)
    store.chunk_index.path(info_of(v1).sha256).write_text("{not json")
    assert store.chunk_index.held() == {}
    server = Server(v1 + b"x")
    assert (await store.fetch(server, info_of(v1 + b"x"))).read_bytes() == v1 + b"x"  # type: ignore[arg-type]
    assert store.counters.fetched_bytes == len(v1) + 1
    assert store.collect_garbage([]) and not any(store.chunk_index.index_dir.iterdir())


async def test_a_control_plane_that_ignores_the_range_is_cut_off_after_it(tmp_path: Path) -> None:
    v1 = os.urandom(10 * PIECE)
    v2 = v1[:3000] + os.urandom(PIECE) + v1[4000:]
    store = store_holding(tmp_path, v1)
    assert (await store.fetch(Server(v2, ranges=False), info_of(v2))).read_bytes() == v2  # type: ignore[arg-type]
    assert PIECE <= store.counters.fetched_bytes <= PIECE + 2 * 700  # at most one piece past the range


class DroppingServer(Server):
    """Ends its first stream early, after ``drop_after`` bytes, as a dropped connection does."""

    def __init__(self, data: bytes, drop_after: int) -> None:
        super().__init__(data)
        self.drop_after: int | None = drop_after

    def FetchArtifact(self, request: device_pb2.FetchArtifactRequest) -> Stream:
        stream = super().FetchArtifact(request)
        if self.drop_after is not None:
            stream.end, self.drop_after = request.offset + self.drop_after, None
        return stream


async def test_an_interrupted_download_resumes_after_the_chunks_it_wrote(tmp_path: Path) -> None:
    v1 = os.urandom(10 * PIECE)
    v2 = v1[:2000] + os.urandom(5 * PIECE) + v1[7000:]
    store = store_holding(tmp_path, v1)
    server = DroppingServer(v2, drop_after=2 * PIECE + 400)  # chunks 2 and 3 arrive, 4 is torn
    assert (await store.fetch(server, info_of(v2))).read_bytes() == v2  # type: ignore[arg-type]
    assert server.ranges == [(2000, 5 * PIECE), (4000, 3 * PIECE)]  # chunks 2-3 not fetched again
    assert store.counters.copied_bytes == 5 * PIECE
