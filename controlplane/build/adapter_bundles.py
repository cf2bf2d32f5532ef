"""Adapter releases: a LoRA adapter GGUF signed as a release of its own over a named base release.

The release's one variant's artifact is the adapter file; its manifest's ``adapter_base`` names
the base release (bundle name, version and the sha256 of the base's GGUF artifact), signed with
every other field, so a device installs the adapter only over those exact weights. The file is
checked here, when the bundle is built, so an operator learns that a file is no LoRA adapter
before any device downloads it; a device still checks it against its base when it loads it.

The checks read the GGUF header with the ``gguf`` package (the control plane never imports the
agent, whose runtime makes the fuller checks against the base's tensors).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from securesystemslib.signer import Signer

from edgefleet.controlplane.build.bundles import (
    BundleError,
    BundleOnDisk,
    VariantFile,
    check_bundle_name,
    open_bundle,
    write_bundle,
)
from edgefleet.protos.fleet.v1 import bundle_pb2, common_pb2

ADAPTER_ARTIFACT = "adapter.gguf"
ADAPTER_VARIANT = "lora-gguf"
# An adapter is a few to a few hundred MiB; a larger file is a model given by mistake.
MAX_ADAPTER_BYTES = 2 << 30
_BASE_REF = re.compile(r"^(?P<name>[^@]+)@(?P<version>[1-9][0-9]{0,18})$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


class AdapterFileInvalid(BundleError):
    """The file given as an adapter is not a LoRA adapter GGUF (missing, not GGUF, another
    ``general.type`` or ``adapter.type``, or larger than an adapter may be)."""


class AdapterBaseInvalid(BundleError):
    """The base named for an adapter is malformed, or is not a release with one GGUF artifact."""


@dataclass(frozen=True, slots=True)
class AdapterFileInfo:
    """What the adapter's own header says."""

    architecture: str
    alpha: float


def _field_string(reader: object, key: str) -> str | None:
    fields = getattr(reader, "fields", {})
    field = fields.get(key)
    if field is None or not field.data:
        return None
    return bytes(field.parts[field.data[0]]).decode("utf-8", errors="replace")


def read_adapter_file(path: Path) -> AdapterFileInfo:
    """Checks that ``path`` is a LoRA adapter GGUF (``general.type`` "adapter", ``adapter.type``
    "lora"), raising AdapterFileInvalid with the reason."""
    from gguf import GGUFReader  # imported only when building bundles

    try:
        size = path.stat().st_size
    except OSError as exc:
        raise AdapterFileInvalid(f"cannot read adapter file {path}: {exc.strerror or exc}") from exc
    if size > MAX_ADAPTER_BYTES:
        raise AdapterFileInvalid(
            f"adapter file {path} has {size} bytes, more than an adapter's limit of {MAX_ADAPTER_BYTES}"
        )
    try:
        reader = GGUFReader(path)
    except Exception as exc:  # the gguf reader raises several types for a file that is no GGUF
        raise AdapterFileInvalid(f"{path} is not a readable GGUF file: {exc}") from exc
    kind, adapter = _field_string(reader, "general.type"), _field_string(reader, "adapter.type")
    if kind != "adapter" or adapter != "lora":
        raise AdapterFileInvalid(
            f"{path} is not a LoRA adapter (general.type {kind!r}, adapter.type {adapter!r}; "
            "expected 'adapter' and 'lora')"
        )
    alpha_field = reader.fields.get("adapter.lora.alpha")
    alpha = float(alpha_field.parts[alpha_field.data[0]][0]) if alpha_field is not None else 0.0
    return AdapterFileInfo(
        architecture=_field_string(reader, "general.architecture") or "unknown", alpha=alpha
    )


def parse_base_ref(ref: str) -> tuple[str, int]:
    """``NAME@VERSION`` as (name, version)."""
    match = _BASE_REF.match(ref)
    if match is None:
        raise AdapterBaseInvalid(f"base {ref!r} must be NAME@VERSION, e.g. smollm2@3")
    return check_bundle_name(match["name"]), int(match["version"])


def base_from_bundle(bundle_dir: Path, *, name: str, version: int) -> bundle_pb2.AdapterBase:
    """The base reference read from the base's own bundle directory, which must be ``name@version``
    with exactly one GGUF variant (the weights the adapter was trained for)."""
    base = open_bundle(bundle_dir).release
    if (base.name, base.version) != (name, version):
        raise AdapterBaseInvalid(
            f"{bundle_dir} holds {base.name}@{base.version}, not the base {name}@{version}"
        )
    if base.manifest.HasField("adapter_base"):
        raise AdapterBaseInvalid(f"{name}@{version} is itself an adapter; an adapter's base must be a model")
    ggufs = [v for v in base.manifest.variants if v.format == common_pb2.MODEL_FORMAT_GGUF]
    if len(ggufs) != 1 or len(base.manifest.variants) != 1:
        raise AdapterBaseInvalid(
            f"{name}@{version} has {len(base.manifest.variants)} variants; an adapter's base must have "
            "exactly one, a GGUF model"
        )
    return bundle_pb2.AdapterBase(
        name=name, version=version, artifact_sha256=base.artifacts[ggufs[0].artifact].sha256
    )


def adapter_base(name: str, version: int, artifact_sha256: str) -> bundle_pb2.AdapterBase:
    """A base reference given by its parts (the digest as ``fleetctl bundle inspect`` shows it)."""
    digest = artifact_sha256.lower()
    if not _SHA256.match(digest):
        raise AdapterBaseInvalid(f"base artifact sha256 {artifact_sha256!r} is not 64 hex digits")
    return bundle_pb2.AdapterBase(name=check_bundle_name(name), version=version, artifact_sha256=digest)


def build_adapter_bundle(
    adapter: Path,
    *,
    base: bundle_pb2.AdapterBase,
    name: str,
    version: int,
    out: Path,
    signers: Sequence[Signer],
    expires_in: timedelta = timedelta(days=90),
    description: str = "",
) -> BundleOnDisk:
    """Writes a signed release whose one artifact is ``adapter`` and whose manifest names ``base``."""
    check_bundle_name(name)
    if name == base.name:
        raise AdapterBaseInvalid(f"an adapter release may not share its base's name {name!r}")
    read_adapter_file(adapter)
    size = adapter.stat().st_size
    variant = bundle_pb2.Variant(
        id=ADAPTER_VARIANT,
        format=common_pb2.MODEL_FORMAT_GGUF,
        quantization="LORA",
        artifact=ADAPTER_ARTIFACT,
        size_bytes=size,
        # The adapter's weights are read into memory beside the base's.
        min_ram_bytes=size,
    )
    return write_bundle(
        [VariantFile(adapter, variant)],
        name=name,
        version=version,
        out=out,
        signers=signers,
        expires_in=expires_in,
        description=description,
        adapter_base=base,
    )
