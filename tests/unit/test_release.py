"""Pure verification of release metadata and artifact bytes: every refusal has its own type."""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from tuf.api.metadata import Metadata, TargetFile, Targets
from tuf.api.serialization.json import JSONSerializer

from edgefleet.controlplane.trust.keys import KeyDir, init_keys
from edgefleet.protos.fleet import release
from edgefleet.protos.fleet.uptane import IMAGE
from edgefleet.protos.fleet.v1 import bundle_pb2, common_pb2

ARTIFACT = b"GGUF" + bytes(range(256)) * 8


@pytest.fixture(scope="module")
def keydir(tmp_path_factory: pytest.TempPathFactory) -> KeyDir:
    return init_keys(tmp_path_factory.mktemp("k") / "keys")


def make_release(
    keydir: KeyDir,
    *,
    signer: str = "release",
    version: int = 3,
    manifest_version: int | None = None,
    path: str = "model.q4_0.gguf",
    variant_artifact: str | None = None,
    expires: datetime | None = None,
) -> bytes:
    manifest = bundle_pb2.BundleManifest(
        schema_version=1,
        name="tiny",
        version=manifest_version if manifest_version is not None else version,
        variants=[
            bundle_pb2.Variant(
                id="gguf-q4_0",
                format=common_pb2.MODEL_FORMAT_GGUF,
                quantization="Q4_0",
                artifact=variant_artifact or path,
                size_bytes=len(ARTIFACT),
            )
        ],
    )
    targets = Targets(
        version=version,
        expires=expires or datetime.now(UTC) + timedelta(days=1),
        targets={path: TargetFile(len(ARTIFACT), {"sha256": hashlib.sha256(ARTIFACT).hexdigest()}, path)},
        unrecognized_fields={release.MANIFEST_FIELD: release.manifest_to_json(manifest)},
    )
    md = Metadata(targets)
    signers = keydir.release_signers() if signer == "release" else keydir.signers(IMAGE, "timestamp")
    for key in signers:
        md.sign(key, append=True)
    return md.to_bytes(JSONSerializer())


def root_of(keydir: KeyDir) -> release.Root:
    return release.load_trusted_root(keydir.root_bytes(IMAGE))


def test_valid_release(keydir: KeyDir) -> None:
    verified = release.verify_release(make_release(keydir), root=root_of(keydir))
    assert (verified.name, verified.version) == ("tiny", 3)
    info = verified.artifacts["model.q4_0.gguf"]
    assert info.length == len(ARTIFACT)
    assert verified.variant("gguf-q4_0").quantization == "Q4_0"


def test_wrong_key_is_refused(keydir: KeyDir) -> None:
    with pytest.raises(release.UntrustedMetadata, match="signed by 0/1"):
        release.verify_release(make_release(keydir, signer="online"), root=root_of(keydir))


def test_key_from_another_root_is_refused(keydir: KeyDir, tmp_path: Path) -> None:
    other = init_keys(tmp_path / "other")
    with pytest.raises(release.UntrustedMetadata):
        release.verify_release(make_release(other), root=root_of(keydir))


def test_edited_signed_content_is_refused(keydir: KeyDir) -> None:
    doc = json.loads(make_release(keydir))
    doc["signed"]["targets"]["model.q4_0.gguf"]["hashes"]["sha256"] = "0" * 64
    data = json.dumps(doc).encode()
    with pytest.raises(release.UntrustedMetadata):
        release.verify_release(data, root=root_of(keydir))


def test_expired_release_is_refused_unless_reloading_installed(keydir: KeyDir) -> None:
    data = make_release(keydir, expires=datetime.now(UTC) - timedelta(minutes=1))
    with pytest.raises(release.ExpiredMetadata):
        release.verify_release(data, root=root_of(keydir))
    assert release.verify_release(data, root=root_of(keydir), check_expiry=False).version == 3


@pytest.mark.parametrize("path", ["../escape.gguf", "/etc/passwd", "a/../../b", "./x", "a//b", "a\\b"])
def test_unsafe_paths_are_refused(keydir: KeyDir, path: str) -> None:
    with pytest.raises(release.UnsafeTargetPath):
        release.verify_release(make_release(keydir, path=path), root=root_of(keydir))


def test_variant_naming_unsigned_artifact(keydir: KeyDir) -> None:
    data = make_release(keydir, variant_artifact="other.gguf")
    with pytest.raises(release.ManifestMismatch, match="unsigned artifact"):
        release.verify_release(data, root=root_of(keydir))


def test_manifest_version_must_match_signed_version(keydir: KeyDir) -> None:
    with pytest.raises(release.ManifestMismatch):
        release.verify_release(make_release(keydir, manifest_version=2), root=root_of(keydir))


@pytest.mark.parametrize(
    "data", [b"", b"{}", b"not json", b'{"signed": {"_type": "root"}, "signatures": []}']
)
def test_garbage_is_malformed(keydir: KeyDir, data: bytes) -> None:
    with pytest.raises(release.MalformedMetadata):
        release.verify_release(data, root=root_of(keydir))


def test_tampered_root_is_refused(keydir: KeyDir) -> None:
    data = keydir.root_bytes(IMAGE).replace(b'"threshold": 1', b'"threshold": 0', 1)
    with pytest.raises((release.UntrustedMetadata, release.MalformedMetadata)):
        release.load_trusted_root(data)


def _info() -> release.ArtifactInfo:
    return release.ArtifactInfo("a", len(ARTIFACT), hashlib.sha256(ARTIFACT).hexdigest())


def test_artifact_verifier_accepts_exact_bytes() -> None:
    verifier = release.ArtifactVerifier(_info())
    for i in range(0, len(ARTIFACT), 100):
        verifier.update(ARTIFACT[i : i + 100])
    verifier.finish()


def test_artifact_verifier_stops_endless_data() -> None:
    verifier = release.ArtifactVerifier(_info())
    verifier.update(ARTIFACT)
    with pytest.raises(release.ArtifactTooLong):
        verifier.update(b"x")


def test_artifact_verifier_short_and_wrong() -> None:
    short = release.ArtifactVerifier(_info())
    short.update(ARTIFACT[:-1])
    with pytest.raises(release.ArtifactLengthMismatch):
        short.finish()
    wrong = release.ArtifactVerifier(_info())
    wrong.update(b"X" + ARTIFACT[1:])
    with pytest.raises(release.ArtifactHashMismatch):
        wrong.finish()
