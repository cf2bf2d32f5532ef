"""Adapter releases: a LoRA adapter GGUF signed over a named base release (tiny GGUFs written with
the gguf package's writer), the manifest's base fields under the release signature, and the
build-time refusals of files that are no adapter and of bases that cannot be named."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from gguf import GGUFWriter
from typer.testing import CliRunner

from edgefleet.controlplane.build.adapter_bundles import (
    ADAPTER_ARTIFACT,
    AdapterBaseInvalid,
    AdapterFileInvalid,
    adapter_base,
    base_from_bundle,
    build_adapter_bundle,
    parse_base_ref,
    read_adapter_file,
)
from edgefleet.controlplane.build.bundles import (
    BundleError,
    VariantFile,
    open_bundle,
    sha256_file,
    write_bundle,
)
from edgefleet.controlplane.cli.main import app
from edgefleet.controlplane.trust.keys import KeyDir, init_keys
from edgefleet.protos.fleet import release
from edgefleet.protos.fleet.v1 import bundle_pb2, common_pb2


@pytest.fixture(scope="module")
def keydir(tmp_path_factory: pytest.TempPathFactory) -> KeyDir:
    return init_keys(tmp_path_factory.mktemp("k") / "keys")


def write_gguf(path: Path, *, kind: str, lora: bool = True) -> Path:
    writer = GGUFWriter(path, "llama")
    writer.add_type(kind)
    if lora:
        writer.add_string("adapter.type", "lora")
        writer.add_float32("adapter.lora.alpha", 8.0)
    writer.add_tensor("blk.0.attn_q.weight.lora_a", np.zeros((2, 16), np.float32))
    writer.add_tensor("blk.0.attn_q.weight.lora_b", np.zeros((16, 2), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture
def adapter(tmp_path: Path) -> Path:
    return write_gguf(tmp_path / "style.gguf", kind="adapter")


@pytest.fixture
def base_bundle(tmp_path: Path, keydir: KeyDir) -> Path:
    model = write_gguf(tmp_path / "base.gguf", kind="model", lora=False)
    variant = bundle_pb2.Variant(id="gguf-f32", format=common_pb2.MODEL_FORMAT_GGUF, artifact="model.gguf")
    write_bundle(
        [VariantFile(model, variant)],
        name="smollm2",
        version=3,
        out=tmp_path / "base-bundle",
        signers=keydir.release_signers(),
    )
    return tmp_path / "base-bundle"


def test_an_adapter_release_signs_its_base_by_name_version_and_digest(
    tmp_path: Path, keydir: KeyDir, adapter: Path, base_bundle: Path
) -> None:
    base = base_from_bundle(base_bundle, name="smollm2", version=3)
    assert base.artifact_sha256 == sha256_file(base_bundle / "artifacts" / "model.gguf")
    built = build_adapter_bundle(
        adapter, base=base, name="style", version=1, out=tmp_path / "out", signers=keydir.release_signers()
    )
    verified = release.verify_release(
        built.release.metadata, root=release.load_trusted_root(keydir.root_bytes("image"))
    )
    assert verified.adapter_base == base
    assert [v.artifact for v in verified.manifest.variants] == [ADAPTER_ARTIFACT]
    assert verified.artifacts[ADAPTER_ARTIFACT].sha256 == sha256_file(adapter)
    # A model release names no base.
    assert open_bundle(base_bundle).release.adapter_base is None


def test_the_base_is_covered_by_the_signature(tmp_path: Path, keydir: KeyDir, adapter: Path) -> None:
    built = build_adapter_bundle(
        adapter,
        base=adapter_base("smollm2", 3, "a" * 64),
        name="style",
        version=1,
        out=tmp_path / "out",
        signers=keydir.release_signers(),
    )
    tampered = built.release.metadata.replace(b'"name": "smollm2"', b'"name": "gemma3"')
    assert tampered != built.release.metadata
    with pytest.raises(release.UntrustedMetadata):
        release.verify_release(tampered, root=release.load_trusted_root(keydir.root_bytes("image")))


@pytest.mark.parametrize(
    ("kind", "lora"),
    [("model", False), ("adapter", False), ("model", True)],
    ids=["model", "no-type", "kind"],
)
def test_a_file_that_is_no_lora_adapter_is_refused_at_build_time(
    tmp_path: Path, keydir: KeyDir, kind: str, lora: bool
) -> None:
    path = write_gguf(tmp_path / "x.gguf", kind=kind, lora=lora)
    with pytest.raises(AdapterFileInvalid, match="not a LoRA adapter"):
        build_adapter_bundle(
            path,
            base=adapter_base("smollm2", 3, "a" * 64),
            name="style",
            version=1,
            out=tmp_path / "out",
            signers=keydir.release_signers(),
        )
    assert not (tmp_path / "out").exists()


def test_a_file_that_is_no_gguf_or_missing_is_refused(tmp_path: Path) -> None:
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf file at all" * 10)
    with pytest.raises(AdapterFileInvalid, match="not a readable GGUF"):
        read_adapter_file(tmp_path / "junk.gguf")
    with pytest.raises(AdapterFileInvalid, match="cannot read"):
        read_adapter_file(tmp_path / "missing.gguf")


def test_malformed_base_references_are_refused(base_bundle: Path, adapter: Path) -> None:
    assert parse_base_ref("smollm2@3") == ("smollm2", 3)
    for ref in ("smollm2", "smollm2@0", "smollm2@x", "@3", "Bad Name@3"):
        with pytest.raises(BundleError):
            parse_base_ref(ref)
    with pytest.raises(AdapterBaseInvalid, match="64 hex"):
        adapter_base("smollm2", 3, "abc")
    with pytest.raises(AdapterBaseInvalid, match="not the base smollm2@4"):
        base_from_bundle(base_bundle, name="smollm2", version=4)


def test_an_adapter_may_not_share_its_bases_name(tmp_path: Path, keydir: KeyDir, adapter: Path) -> None:
    with pytest.raises(AdapterBaseInvalid, match="share"):
        build_adapter_bundle(
            adapter,
            base=adapter_base("smollm2", 3, "a" * 64),
            name="smollm2",
            version=4,
            out=tmp_path / "out",
            signers=keydir.release_signers(),
        )


def test_the_device_side_check_refuses_an_adapter_manifest_without_a_valid_base() -> None:
    manifest = bundle_pb2.BundleManifest(
        name="style",
        version=1,
        variants=[bundle_pb2.Variant(id="lora-gguf", artifact=ADAPTER_ARTIFACT)],
        adapter_base=bundle_pb2.AdapterBase(name="smollm2", version=3, artifact_sha256="Z" * 64),
    )
    with pytest.raises(release.ManifestMismatch, match="malformed sha256"):
        release._check_adapter_base(manifest)


def test_fleetctl_builds_an_adapter_release_from_the_bases_bundle(
    tmp_path: Path, keydir: KeyDir, adapter: Path, base_bundle: Path
) -> None:
    args = ["bundle", "build", "--keys-dir", str(keydir.path), "--name", "style", "--version", "1"]
    args += ["-o", str(tmp_path / "out"), "--adapter", str(adapter), "--base", "smollm2@3"]
    result = CliRunner().invoke(app, [*args, "--base-bundle", str(base_bundle)])
    assert result.exit_code == 0, result.output
    assert open_bundle(tmp_path / "out").release.adapter_base.name == "smollm2"  # type: ignore[union-attr]
    refused = CliRunner().invoke(app, [*args, "--base-bundle", str(base_bundle), "--base-sha256", "a" * 64])
    assert refused.exit_code != 0
