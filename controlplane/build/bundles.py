"""Builds signed bundles on disk and reads them back for pushing.

A bundle directory holds ``release.json`` (TUF targets metadata signed by the release key,
with the manifest embedded, see :mod:`edgefleet.protos.fleet.release`) and ``artifacts/<path>`` for
every target the metadata names. Each target's custom data carries the artifact's chunk list
(:mod:`edgefleet.protos.fleet.chunk_list`), signed with its length and hash, so devices that
hold part of it already fetch only the rest.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from securesystemslib.signer import Signer
from tuf.api.metadata import Metadata, Root, TargetFile, Targets
from tuf.api.serialization.json import JSONSerializer

from edgefleet.controlplane.build.gguf_info import read_gguf_info
from edgefleet.protos.fleet import chunk_list, release
from edgefleet.protos.fleet.chunking import TooManyChunks
from edgefleet.protos.fleet.fsio import atomic_write_bytes
from edgefleet.protos.fleet.v1 import bundle_pb2, common_pb2

log = logging.getLogger(__name__)

RELEASE_FILE = "release.json"
ARTIFACT_DIR = "artifacts"
NAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9._-]{0,127}$")
HASH_CHUNK = 1 << 20


class BundleError(Exception):
    """A bundle cannot be built or read."""


@dataclass(frozen=True, slots=True)
class BundleOnDisk:
    path: Path
    release: release.VerifiedRelease

    def artifact_path(self, target: str) -> Path:
        return self.path / ARTIFACT_DIR / release.check_target_path(target)


def check_bundle_name(name: str) -> str:
    if not NAME_PATTERN.match(name):
        raise BundleError(
            f"bundle name {name!r} must be lowercase letters, digits, '.', '_' or '-', up to 128 characters"
        )
    return name


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _copy_or_link(source: Path, dest: Path) -> None:
    """Hard-links when possible (same filesystem, no copy of gigabytes), copies otherwise."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.unlink(missing_ok=True)
    try:
        os.link(source, dest)
    except OSError:
        shutil.copyfile(source, dest)


def gguf_variant(model: Path) -> bundle_pb2.Variant:
    """Describes a GGUF file as a bundle variant from its own header."""
    info = read_gguf_info(model)
    artifact = f"model.{info.quantization.lower()}.gguf"
    size = model.stat().st_size
    return bundle_pb2.Variant(
        id=f"gguf-{info.quantization.lower()}",
        format=common_pb2.MODEL_FORMAT_GGUF,
        quantization=info.quantization,
        artifact=artifact,
        size_bytes=size,
        # Weights are memory-mapped; a KV cache and compute buffers come on top.
        min_ram_bytes=size + 256 * 1024 * 1024,
        context_length=info.context_length,
        has_chat_template=info.has_chat_template,
    )


@dataclass(frozen=True, slots=True)
class VariantFile:
    """A built variant: the file that becomes its artifact and how the manifest describes it."""

    path: Path
    variant: bundle_pb2.Variant


def build_bundle(
    model: Path,
    *,
    name: str,
    version: int,
    out: Path,
    signers: Sequence[Signer],
    expires_in: timedelta = timedelta(days=90),
    description: str = "",
    chunk_lists: bool = True,
) -> BundleOnDisk:
    """Writes a signed single-variant bundle for a GGUF model into ``out``."""
    check_bundle_name(name)
    if not model.is_file():
        raise BundleError(f"model file {model} does not exist")
    variant = gguf_variant(model)
    return write_bundle(
        [VariantFile(model, variant)],
        name=name,
        version=version,
        out=out,
        signers=signers,
        expires_in=expires_in,
        description=description,
        chunk_lists=chunk_lists,
    )


def write_bundle(
    variants: Sequence[VariantFile],
    *,
    name: str,
    version: int,
    out: Path,
    signers: Sequence[Signer],
    expires_in: timedelta = timedelta(days=90),
    description: str = "",
    chunk_lists: bool = True,
    adapter_base: bundle_pb2.AdapterBase | None = None,
) -> BundleOnDisk:
    """Writes a signed bundle of one or more variants into ``out``; ``chunk_lists=False`` signs
    no chunk lists (devices then fetch every artifact whole, as for releases built before them).
    ``adapter_base`` makes it a LoRA adapter release over that base (see ``adapter_bundles``)."""
    check_bundle_name(name)
    if version < 1:
        raise BundleError(f"version must be a positive integer, got {version}")
    if not variants:
        raise BundleError("a bundle needs at least one variant")
    ids = [v.variant.id for v in variants]
    if len(set(ids)) != len(ids):
        raise BundleError(f"variant ids must be unique, got {ids}")
    targets: dict[str, TargetFile] = {}
    described = []
    for item in variants:
        variant = bundle_pb2.Variant()
        variant.CopyFrom(item.variant)
        artifact = release.check_target_path(variant.artifact)
        target_path = out / ARTIFACT_DIR / artifact
        _copy_or_link(item.path, target_path)
        length = target_path.stat().st_size
        variant.size_bytes = length
        targets[artifact] = TargetFile(
            length=length,
            hashes={"sha256": sha256_file(target_path)},
            path=artifact,
            unrecognized_fields=_chunk_fields(target_path) if chunk_lists else {},
        )
        described.append(variant)
    manifest = bundle_pb2.BundleManifest(
        schema_version=release.MANIFEST_SCHEMA_VERSION,
        name=name,
        version=version,
        variants=described,
        description=description,
        adapter_base=adapter_base,
    )
    metadata = Metadata(
        Targets(
            version=version,
            expires=datetime.now(UTC) + expires_in,
            targets=targets,
            unrecognized_fields={release.MANIFEST_FIELD: release.manifest_to_json(manifest)},
        )
    )
    for signer in signers:
        metadata.sign(signer, append=True)
    data = metadata.to_bytes(JSONSerializer(compact=False))
    atomic_write_bytes(out / RELEASE_FILE, data)
    return BundleOnDisk(path=out, release=release.read_release_unverified(data))


def _chunk_fields(path: Path) -> dict[str, object]:
    """The target's custom data holding its chunk list; none for a file that would need more
    chunks than a release may sign (it is fetched whole)."""
    try:
        chunks = chunk_list.chunk_artifact(path)
    except TooManyChunks as exc:
        log.warning("%s is published without a chunk list: %s", path.name, exc)
        return {}
    return {"custom": {release.MANIFEST_FIELD: {chunk_list.CHUNKS_FIELD: chunk_list.encode_chunks(chunks)}}}


def open_bundle(path: Path, *, root: Root | None = None) -> BundleOnDisk:
    """Reads a bundle directory, verifying its signatures when a trusted root is given."""
    try:
        data = (path / RELEASE_FILE).read_bytes()
    except FileNotFoundError as exc:
        raise BundleError(f"{path} is not a bundle: {RELEASE_FILE} is missing") from exc
    verified = (
        release.verify_release(data, root=root) if root is not None else release.read_release_unverified(data)
    )
    bundle = BundleOnDisk(path=path, release=verified)
    for target in verified.artifacts:
        if not bundle.artifact_path(target).is_file():
            raise BundleError(f"bundle {path} lacks artifact {target}")
    return bundle
