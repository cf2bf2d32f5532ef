"""The Uptane arrangement of TUF that both sides share: trust anchors, target naming, and the
edgefleet fields carried inside signed targets metadata.

* The **image repository** lists every release's artifacts as targets named
  ``{bundle}/{version}/{artifact}``; each target's ``custom`` field says which release and
  variant it belongs to. Its ``targets`` role is signed by the release keys (may be offline).
* The **director repository** holds, per device, targets metadata signed online by the
  control plane naming the targets that device should install; its signed part carries the
  device id and the deployment generation.

An agent installs only what both agree on (same path, length and hashes).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from google.protobuf import json_format
from tuf.api.metadata import TargetFile, Targets

from edgefleet.protos.fleet.chunk_list import ChunkList, encode_chunks, signed_chunks
from edgefleet.protos.fleet.device_config import config_from_json
from edgefleet.protos.fleet.release import ArtifactInfo, MalformedMetadata, check_target_path
from edgefleet.protos.fleet.v1 import bundle_pb2, common_pb2

IMAGE = "image"
DIRECTOR = "director"
CUSTOM_KEY = "edgefleet"
TRUST_SCHEMA_VERSION = 1


@dataclass(frozen=True, slots=True)
class TrustAnchors:
    """The root metadata of both repositories, as a device is provisioned with them."""

    image_root: bytes
    director_root: bytes
    tls_ca: bytes | None = None  # PEM of the fleet CA the control plane's certificate chains to

    def to_bytes(self) -> bytes:
        document: dict[str, Any] = {
            "schema_version": TRUST_SCHEMA_VERSION,
            IMAGE: json.loads(self.image_root),
            DIRECTOR: json.loads(self.director_root),
        }
        if self.tls_ca is not None:
            document["tls_ca"] = self.tls_ca.decode()
        return json.dumps(document, indent=2, sort_keys=True).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> TrustAnchors:
        try:
            raw = json.loads(data)
            if raw.get("schema_version") != TRUST_SCHEMA_VERSION:
                raise MalformedMetadata(f"trust file schema_version must be {TRUST_SCHEMA_VERSION}")
            tls_ca = raw.get("tls_ca")
            return cls(
                image_root=json.dumps(raw[IMAGE]).encode(),
                director_root=json.dumps(raw[DIRECTOR]).encode(),
                tls_ca=tls_ca.encode() if isinstance(tls_ca, str) else None,
            )
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise MalformedMetadata(f"trust file is not an edgefleet trust file: {exc}") from exc


def image_target_path(bundle: str, version: int, artifact: str) -> str:
    return check_target_path(f"{bundle}/{version}/{artifact}")


@dataclass(frozen=True, slots=True)
class ImageTarget:
    """One artifact of one release, as the image repository describes it."""

    bundle: str
    version: int
    variant: bundle_pb2.Variant
    info: ArtifactInfo
    adapter_base: bundle_pb2.AdapterBase | None = None  # set: the release is a LoRA adapter over it


def image_target_custom(
    bundle: str,
    version: int,
    variant: bundle_pb2.Variant,
    chunks: ChunkList | None = None,
    adapter_base: bundle_pb2.AdapterBase | None = None,
) -> dict[str, Any]:
    """The custom data of an image target; ``chunks``, the artifact's chunk list, is signed with
    the rest so a device can fetch only the chunks it lacks (see :mod:`.chunk_list`);
    ``adapter_base``, for a LoRA adapter release, names the base release it installs over."""
    fields: dict[str, Any] = {
        "bundle": bundle,
        "version": version,
        "variant": json_format.MessageToDict(variant),
    }
    if chunks is not None:
        fields["chunks"] = encode_chunks(chunks)
    if adapter_base is not None:
        fields["adapter_base"] = json_format.MessageToDict(adapter_base)
    return {CUSTOM_KEY: fields}


def artifact_info(path: str, target: TargetFile) -> ArtifactInfo:
    digest = target.hashes.get("sha256")
    if digest is None:
        raise MalformedMetadata(f"target {path!r} has no sha256 hash")
    return ArtifactInfo(path=check_target_path(path), length=target.length, sha256=digest.lower())


def parse_image_target(path: str, target: TargetFile) -> ImageTarget:
    """Reads the release and variant a signed image target belongs to."""
    raw = target.unrecognized_fields.get("custom", {}).get(CUSTOM_KEY)
    if not isinstance(raw, dict):
        raise MalformedMetadata(f"image target {path!r} has no {CUSTOM_KEY!r} custom field")
    try:
        variant = json_format.ParseDict(raw["variant"], bundle_pb2.Variant(), ignore_unknown_fields=True)
        bundle, version = str(raw["bundle"]), int(raw["version"])
        base = raw.get("adapter_base")
        adapter_base = (
            None
            if base is None
            else json_format.ParseDict(base, bundle_pb2.AdapterBase(), ignore_unknown_fields=True)
        )
    except (KeyError, TypeError, ValueError, json_format.ParseError) as exc:
        raise MalformedMetadata(f"image target {path!r} has a malformed custom field: {exc}") from exc
    info = artifact_info(path, target)
    # A chunk list that does not cover the signed length exactly is refused (MalformedChunkList).
    chunks = signed_chunks(raw, info.length, where=f"image target {path!r}")
    if chunks is not None:
        info = ArtifactInfo(path=info.path, length=info.length, sha256=info.sha256, chunks=chunks)
    return ImageTarget(bundle=bundle, version=version, variant=variant, info=info, adapter_base=adapter_base)


def release_targets(targets: Targets, bundle: str, version: int) -> dict[str, ImageTarget]:
    """Every target of one release in the image repository's targets metadata."""
    found = {}
    for path, target in targets.targets.items():
        parsed = parse_image_target(path, target)
        if (parsed.bundle, parsed.version) == (bundle, version):
            found[path] = parsed
    return found


@dataclass(frozen=True, slots=True)
class DirectorAssignment:
    """What the director tells one device to run: every model it should hold, one release per
    bundle name (an empty ``releases`` tells it to hold none)."""

    device_id: str
    generation: int
    releases: tuple[tuple[str, int], ...]  # (bundle, version), sorted by bundle name
    targets: Mapping[str, ArtifactInfo]
    pin: common_pb2.VariantPin | None = None  # an operator's variant or runtime pin, signed with the rest
    config: common_pb2.DeviceConfig | None = None  # the device's runtime settings, signed with the rest


def director_fields(device_id: str, generation: int, releases: Sequence[tuple[str, int]]) -> dict[str, Any]:
    return {
        CUSTOM_KEY: {
            "deviceId": device_id,
            "generation": generation,
            "bundles": [{"name": name, "version": version} for name, version in sorted(releases)],
        }
    }


def parse_director_targets(targets: Targets) -> DirectorAssignment:
    raw = targets.unrecognized_fields.get(CUSTOM_KEY)
    if not isinstance(raw, dict):
        raise MalformedMetadata(f"director targets lack the {CUSTOM_KEY!r} field")
    try:
        # "bundle" (one release) is what control planes before several-model devices signed.
        listed = raw["bundles"] if "bundles" in raw else [raw["bundle"]]
        releases = tuple(sorted((str(b["name"]), int(b["version"])) for b in listed))
        names = [name for name, _ in releases]
        if len(set(names)) != len(names):
            raise ValueError("a bundle name is assigned twice")
        assignment = DirectorAssignment(
            device_id=str(raw["deviceId"]),
            generation=int(raw["generation"]),
            releases=releases,
            targets={path: artifact_info(path, t) for path, t in targets.targets.items()},
            pin=_pin(raw.get("pin")),
            config=_config(raw.get("config")),
        )
    except (KeyError, TypeError, ValueError, json_format.ParseError) as exc:
        raise MalformedMetadata(f"director targets have a malformed {CUSTOM_KEY!r} field: {exc}") from exc
    return assignment


def _pin(raw: object) -> common_pb2.VariantPin | None:
    """The pin in its protobuf JSON form, or None when the director set none."""
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise TypeError(f"pin must be an object, not {type(raw).__name__}")
    return json_format.ParseDict(raw, common_pb2.VariantPin(), ignore_unknown_fields=True)


def _config(raw: object) -> common_pb2.DeviceConfig | None:
    """The device config in its protobuf JSON form, or None when the director set none.

    Unlike the pin, unknown fields are refused: a setting this agent does not know cannot be
    honoured, and skipping it would report a config in force that is not. Ranges are the
    agent's to check (agent/update/updater.py), so a malformed document and an unusable value are told
    apart in what the device reports.
    """
    return None if raw is None else config_from_json(raw)
