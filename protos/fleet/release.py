"""Release metadata: the signed description of one bundle release, and its pure verification.

A release is TUF targets metadata (python-tuf's Metadata API) signed by the release key(s)
named for the ``targets`` role in the device's trusted root. Its signed part carries:

* ``targets``: every artifact's path, length and sha256, as TUF defines them;
* ``version``: the release version (monotonic per bundle name);
* ``expires``: after this the release is refused (freeze attacks);
* ``edgefleet``: the :class:`BundleManifest` (name, version, variants) in protobuf's JSON mapping.

Both sides need this: the control plane checks pushes with it, the agent checks deployments.
Everything here is pure (bytes in, objects or a typed error out); callers do the I/O.
"""

from __future__ import annotations

import hashlib
import posixpath
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from google.protobuf import json_format
from tuf.api import exceptions as tuf_exceptions
from tuf.api.metadata import Metadata, Root, Targets

from edgefleet.protos.fleet.v1 import bundle_pb2

if TYPE_CHECKING:
    from edgefleet.protos.fleet.chunk_list import ChunkList

MANIFEST_FIELD = "edgefleet"
RELEASE_ROLE = "targets"
MANIFEST_SCHEMA_VERSION = 1


class Refusal(Exception):
    """The input is wrong (malformed or unsigned metadata, bytes that do not hash, an unsafe
    archive, a model the runtime will not load, a request no model can serve): the same attempt
    gets the same answer, so it is reported and never retried.

    One of the two error families (python-tuf's RepositoryError against DownloadError); the
    other is :class:`TransientFailure`. Every error the update path can meet belongs to exactly
    one of them, so ``except Refusal`` cannot swallow a failure that retrying would mend. Both
    roots live here, below the agent and the control plane, because release verification is
    the lowest code they share and its errors are refusals."""


class TransientFailure(Exception):
    """Something outside the input failed for now (the control plane is away, a connection
    reset, a disk that is full or busy for a moment): retried, never reported as a refusal of
    what was being installed. The other family; see :class:`Refusal`."""


class ReleaseError(Refusal):
    """Base of the release checks' refusals (metadata, manifests, artifact bytes)."""


class MalformedMetadata(ReleaseError):
    """The bytes are not well-formed release or root metadata."""


class UntrustedMetadata(ReleaseError):
    """Signatures are missing, unknown, invalid or under the threshold."""


class ExpiredMetadata(ReleaseError):
    """The metadata's expiry is in the past (a freeze attack or a stale release)."""


class ManifestMismatch(ReleaseError):
    """The manifest disagrees with the signed metadata it travels in."""


class UnsafeTargetPath(ReleaseError):
    """A target path that could escape the bundle directory."""


class ReplayedMetadata(ReleaseError):
    """Metadata older than what this device already trusts (rollback or replay attack)."""


class MetadataMismatch(ReleaseError):
    """Metadata whose length, hash or version differs from what the signed index says."""


class MetadataTooLong(ReleaseError):
    """A metadata download exceeded its limit (endless data attack)."""


class TargetForAnotherDevice(ReleaseError):
    """Director metadata names a different device than this one."""


class UnknownTarget(ReleaseError):
    """The director names a target the image repository does not list (arbitrary software)."""


class DirectorImageMismatch(ReleaseError):
    """Director and image repositories disagree on a target's length or hashes (mix-and-match)."""


class ArtifactError(ReleaseError):
    """Base of artifact byte checks."""


class ArtifactTooLong(ArtifactError):
    """More bytes arrived than the signed length (endless data attack)."""


class ArtifactLengthMismatch(ArtifactError):
    """The artifact ended before its signed length."""


class ArtifactHashMismatch(ArtifactError):
    """The artifact's sha256 differs from the signed hash."""


@dataclass(frozen=True, slots=True)
class ArtifactInfo:
    """What the signature promises about one artifact. ``chunks``, when the release signed a
    chunk list, lets a device fetch only the chunks it lacks; it takes no part in comparisons
    (the director lists length and hash only, and those are what must agree)."""

    path: str
    length: int
    sha256: str
    chunks: ChunkList | None = field(default=None, compare=False)


@dataclass(frozen=True, slots=True)
class VerifiedRelease:
    """A release whose signatures, expiry and manifest were checked."""

    name: str
    version: int
    expires: datetime
    manifest: bundle_pb2.BundleManifest
    artifacts: Mapping[str, ArtifactInfo]
    metadata: bytes

    @property
    def adapter_base(self) -> bundle_pb2.AdapterBase | None:
        """The base release a LoRA adapter release must be installed over; None for a model."""
        return self.manifest.adapter_base if self.manifest.HasField("adapter_base") else None

    def variant(self, variant_id: str) -> bundle_pb2.Variant:
        for variant in self.manifest.variants:
            if variant.id == variant_id:
                return variant
        raise ManifestMismatch(f"release {self.name}@{self.version} has no variant {variant_id!r}")


def check_target_path(path: str) -> str:
    """Refuses paths that are absolute, climb out, or are not plain relative names."""
    normalized = posixpath.normpath(path)
    if (
        not path
        or path.startswith("/")
        or "\\" in path
        or "\x00" in path
        or normalized != path
        or normalized.startswith("..")
        or any(part in ("", ".", "..") for part in path.split("/"))
    ):
        raise UnsafeTargetPath(f"artifact path {path!r} is not a safe relative path")
    return path


def load_trusted_root(data: bytes, *, now: datetime | None = None) -> Root:
    """Parses the provisioned root and checks it is signed by its own root-role threshold.

    An expired root is still loaded: a device must keep serving offline, and the release
    metadata it protects has its own, shorter expiry.
    """
    try:
        md = Metadata[Root].from_bytes(data)
    except Exception as exc:  # python-tuf raises several types for bad input
        raise MalformedMetadata(f"trusted root is not valid root metadata: {exc}") from exc
    if not isinstance(md.signed, Root):
        raise MalformedMetadata(f"trusted root has type {md.signed.type!r}, expected 'root'")
    try:
        md.signed.verify_delegate(Root.type, md.signed_bytes, md.signatures)
    except tuf_exceptions.UnsignedMetadataError as exc:
        raise UntrustedMetadata(f"trusted root is not signed by its own keys: {exc}") from exc
    return md.signed


def manifest_from_targets(targets: Targets) -> bundle_pb2.BundleManifest:
    """Decodes the manifest embedded in the signed targets, ignoring unknown fields."""
    raw = targets.unrecognized_fields.get(MANIFEST_FIELD)
    if not isinstance(raw, dict):
        raise MalformedMetadata(f"release metadata has no {MANIFEST_FIELD!r} manifest object")
    try:
        return json_format.ParseDict(raw, bundle_pb2.BundleManifest(), ignore_unknown_fields=True)
    except json_format.ParseError as exc:
        raise MalformedMetadata(f"release manifest is malformed: {exc}") from exc


def _parse_targets(data: bytes) -> Metadata[Targets]:
    try:
        md = Metadata[Targets].from_bytes(data)
    except Exception as exc:  # python-tuf raises several types for bad input
        raise MalformedMetadata(f"release metadata is not valid TUF targets metadata: {exc}") from exc
    if not isinstance(md.signed, Targets):
        raise MalformedMetadata(f"release metadata has type {md.signed.type!r}, expected 'targets'")
    return md


def _describe(md: Metadata[Targets], data: bytes) -> VerifiedRelease:
    """Checks paths and manifest consistency; signatures are the caller's business."""
    targets = md.signed
    artifacts: dict[str, ArtifactInfo] = {}
    for path, target in targets.targets.items():
        check_target_path(path)
        digest = target.hashes.get("sha256")
        if digest is None:
            raise MalformedMetadata(f"artifact {path!r} has no sha256 hash")
        artifacts[path] = ArtifactInfo(
            path=path,
            length=target.length,
            sha256=digest.lower(),
            chunks=_signed_chunks(target.unrecognized_fields.get("custom"), target.length, path),
        )

    manifest = manifest_from_targets(targets)
    if manifest.version != targets.version:
        raise ManifestMismatch(
            f"manifest version {manifest.version} differs from signed version {targets.version}"
        )
    if not manifest.name:
        raise ManifestMismatch("manifest has no bundle name")
    if not manifest.variants:
        raise ManifestMismatch("manifest lists no variants")
    if manifest.HasField("adapter_base"):
        _check_adapter_base(manifest)
    for variant in manifest.variants:
        info = artifacts.get(variant.artifact)
        if info is None:
            raise ManifestMismatch(f"variant {variant.id!r} names unsigned artifact {variant.artifact!r}")
        if variant.size_bytes and variant.size_bytes != info.length:
            raise ManifestMismatch(f"variant {variant.id!r} size differs from its signed length")
    return VerifiedRelease(
        name=manifest.name,
        version=targets.version,
        expires=targets.expires,
        manifest=manifest,
        artifacts=artifacts,
        metadata=data,
    )


def _check_adapter_base(manifest: bundle_pb2.BundleManifest) -> None:
    """An adapter release has one variant (the adapter file) and names its base completely."""
    base = manifest.adapter_base
    if len(manifest.variants) != 1:
        raise ManifestMismatch(
            f"adapter release {manifest.name!r} lists {len(manifest.variants)} variants, not one"
        )
    if not base.name or base.version < 1 or base.name == manifest.name:
        raise ManifestMismatch(f"adapter release {manifest.name!r} names no valid base release")
    digest = base.artifact_sha256
    if len(digest) != 64 or digest.strip("0123456789abcdef"):
        raise ManifestMismatch(
            f"adapter release {manifest.name!r} names its base's artifact by a malformed sha256"
        )


def _signed_chunks(custom: object, length: int, path: str) -> ChunkList | None:
    """The chunk list signed in a target's custom data, if any (imported here: the chunker
    builds on this module's error families)."""
    from edgefleet.protos.fleet.chunk_list import signed_chunks

    fields = custom.get(MANIFEST_FIELD) if isinstance(custom, dict) else None
    return signed_chunks(fields, length, where=f"artifact {path!r}")


def read_release_unverified(data: bytes) -> VerifiedRelease:
    """Parses release metadata without checking signatures: for its own signer and for display."""
    return _describe(_parse_targets(data), data)


def verify_release(
    data: bytes, *, root: Root, now: datetime | None = None, check_expiry: bool = True
) -> VerifiedRelease:
    """Checks signature threshold, expiry, paths and manifest consistency of release metadata.

    ``check_expiry=False`` is for re-reading an already installed release at boot: an offline
    device keeps serving what it verified when it installed it.
    """
    md = _parse_targets(data)
    try:
        root.verify_delegate(RELEASE_ROLE, md.signed_bytes, md.signatures)
    except tuf_exceptions.UnsignedMetadataError as exc:
        raise UntrustedMetadata(f"release metadata signature check failed: {exc}") from exc
    if check_expiry and md.signed.is_expired(now or datetime.now(UTC)):
        raise ExpiredMetadata(f"release metadata expired at {md.signed.expires.isoformat()}")
    return _describe(md, data)


class ArtifactVerifier:
    """Incrementally checks an artifact's bytes against what its signature promises.

    Feed chunks in order; more bytes than the signed length raise at once, so a hostile
    server cannot fill the disk. ``finish`` checks length and hash.
    """

    def __init__(self, info: ArtifactInfo) -> None:
        self.info = info
        self.received = 0
        self._hash = hashlib.sha256()

    def update(self, chunk: bytes) -> None:
        if self.received + len(chunk) > self.info.length:
            raise ArtifactTooLong(
                f"artifact {self.info.path!r} exceeds its signed length of {self.info.length} bytes"
            )
        self._hash.update(chunk)
        self.received += len(chunk)

    def finish(self) -> None:
        if self.received != self.info.length:
            raise ArtifactLengthMismatch(
                f"artifact {self.info.path!r} has {self.received} bytes, signed length is {self.info.length}"
            )
        digest = self._hash.hexdigest()
        if digest != self.info.sha256:
            raise ArtifactHashMismatch(
                f"artifact {self.info.path!r} has sha256 {digest}, signed hash is {self.info.sha256}"
            )


def manifest_to_json(manifest: bundle_pb2.BundleManifest) -> dict[str, Any]:
    """The manifest in protobuf's JSON mapping, as embedded in release metadata."""
    return json_format.MessageToDict(manifest)
