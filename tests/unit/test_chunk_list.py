"""Chunk lists in signed metadata: built with the bundle, carried into the image targets, and
refused (typed) unless they cover the artifact's signed length exactly."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
from tuf.api.metadata import Metadata, TargetFile, Targets

from edgefleet.controlplane.build.bundles import VariantFile, open_bundle, write_bundle
from edgefleet.controlplane.cli.client import extend_image_targets
from edgefleet.controlplane.trust.keys import KeyDir, init_keys
from edgefleet.protos.fleet import release, uptane
from edgefleet.protos.fleet.chunk_list import (
    MAX_SIGNED_CHUNKS,
    ChunkList,
    chunk_artifact,
    decode_chunks,
    encode_chunks,
)
from edgefleet.protos.fleet.chunking import Chunk, MalformedChunkList
from edgefleet.protos.fleet.v1 import bundle_pb2, common_pb2

DIGEST = "ab" * 32


@pytest.fixture(scope="module")
def keydir(tmp_path_factory: pytest.TempPathFactory) -> KeyDir:
    return init_keys(tmp_path_factory.mktemp("k") / "keys")


def test_a_list_round_trips_with_offsets_implied_by_order() -> None:
    chunks = ChunkList("cdc", (Chunk(0, 10, DIGEST), Chunk(10, 5, "cd" * 32)))
    assert decode_chunks(encode_chunks(chunks), 15, where="t") == chunks


@pytest.mark.parametrize(
    ("raw", "length", "match"),
    [
        ({"strategy": "cdc", "chunks": [[10, DIGEST]]}, 11, "cover 10 bytes of a 11-byte"),
        ({"strategy": "cdc", "chunks": [[10, DIGEST], [2, DIGEST]]}, 10, "cover 12 bytes of a 10-byte"),
        ({"strategy": "cdc", "chunks": [[0, DIGEST], [10, DIGEST]]}, 10, "chunk 0 is 0 bytes"),
        ({"strategy": "cdc", "chunks": [[10, "AB" * 32]]}, 10, "no lowercase hex"),
        ({"strategy": "cdc", "chunks": [[True, DIGEST]]}, 1, r"not \[length, sha256\]"),
        ({"strategy": "cdc", "chunks": [["10", DIGEST]]}, 10, r"not \[length, sha256\]"),
        ({"strategy": "cdc", "chunks": {}}, 10, "no list of chunks"),
        ({"chunks": []}, 0, "names no strategy"),
        ([], 0, "not an object"),
        ({"strategy": "cdc", "chunks": [[1, DIGEST]] * (MAX_SIGNED_CHUNKS + 1)}, 1, "more than 8192"),
    ],
)
def test_a_list_that_does_not_cover_the_signed_length_is_refused(
    raw: object, length: int, match: str
) -> None:
    with pytest.raises(MalformedChunkList, match=match) as refused:
        decode_chunks(raw, length, where="t")
    assert isinstance(refused.value, release.ReleaseError)  # a refusal the agent reports


def image_target(length: int, chunks: object | None) -> TargetFile:
    custom = uptane.image_target_custom("m", 1, bundle_pb2.Variant(id="v", artifact="a.bin"))
    if chunks is not None:
        custom[uptane.CUSTOM_KEY]["chunks"] = chunks
    return TargetFile(length, {"sha256": DIGEST}, "m/1/a.bin", unrecognized_fields={"custom": custom})


def test_the_device_refuses_an_image_target_whose_list_misses_its_length() -> None:
    short = {"strategy": "cdc", "chunks": [[99, DIGEST]]}
    with pytest.raises(MalformedChunkList, match=r"image target 'm/1/a.bin'.*cover 99 bytes of a 100-byte"):
        uptane.parse_image_target("m/1/a.bin", image_target(100, short))
    exact = uptane.parse_image_target(
        "m/1/a.bin", image_target(100, {"strategy": "cdc", "chunks": [[100, DIGEST]]})
    )
    assert exact.info.chunks == ChunkList("cdc", (Chunk(0, 100, DIGEST),))
    old = uptane.parse_image_target("m/1/a.bin", image_target(100, None))
    assert old.info.chunks is None  # releases from before chunk lists: fetched whole
    assert old.info == exact.info  # the list takes no part in comparing what is signed


def built(tmp_path: Path, keydir: KeyDir, *, chunk_lists: bool) -> release.VerifiedRelease:
    source = tmp_path / "model.onnx.tar"
    source.write_bytes(os.urandom(300_000))
    variant = bundle_pb2.Variant(id="onnx", format=common_pb2.MODEL_FORMAT_ONNX, artifact="model.onnx.tar")
    bundle = write_bundle(
        [VariantFile(source, variant)],
        name="m",
        version=1,
        out=tmp_path / "bundle",
        signers=keydir.release_signers(),
        chunk_lists=chunk_lists,
    )
    return release.verify_release(
        bundle.release.metadata, root=release.load_trusted_root(keydir.root_bytes("image"))
    )


def test_a_built_release_signs_each_artifacts_chunk_list_and_the_image_target_carries_it(
    tmp_path: Path, keydir: KeyDir
) -> None:
    verified = built(tmp_path, keydir, chunk_lists=True)
    info = verified.artifacts["model.onnx.tar"]
    assert info.chunks is not None and info.chunks.strategy == "cdc"  # not a GGUF file
    data = (tmp_path / "bundle" / "artifacts" / "model.onnx.tar").read_bytes()
    assert [hashlib.sha256(data[c.offset : c.end]).hexdigest() for c in info.chunks.chunks] == [
        c.sha256 for c in info.chunks.chunks
    ]
    assert sum(c.length for c in info.chunks.chunks) == info.length
    image = extend_image_targets(None, open_bundle(tmp_path / "bundle"), keydir.release_signers())
    targets = Metadata[Targets].from_bytes(image).signed
    listed = uptane.release_targets(targets, "m", 1)
    assert listed["m/1/model.onnx.tar"].info.chunks == info.chunks


def test_a_release_built_without_chunk_lists_has_none(tmp_path: Path, keydir: KeyDir) -> None:
    assert built(tmp_path, keydir, chunk_lists=False).artifacts["model.onnx.tar"].chunks is None


def test_a_truncated_gguf_file_is_cut_by_content(tmp_path: Path) -> None:
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(b"GGUF" + (3).to_bytes(4, "little") + (5).to_bytes(8, "little") + bytes(100_000))
    chunks = chunk_artifact(truncated)
    assert chunks.strategy == "cdc" and sum(c.length for c in chunks.chunks) == 100_016


def test_a_release_whose_lists_would_overgrow_the_image_targets_is_listed_without_them(
    tmp_path: Path, keydir: KeyDir
) -> None:
    built(tmp_path, keydir, chunk_lists=True)
    bundle = open_bundle(tmp_path / "bundle")
    within = extend_image_targets(None, bundle, keydir.release_signers())
    over = extend_image_targets(None, bundle, keydir.release_signers(), chunk_budget_bytes=500)
    (target,) = uptane.release_targets(Metadata[Targets].from_bytes(over).signed, "m", 1).values()
    assert target.info.chunks is None  # fetched whole; the release itself still signs its list
    assert len(over) < len(within)
