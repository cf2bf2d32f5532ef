"""Chooses which variant of a release this device runs, and says why.

Rules, in order: the format must have a runtime here; the variant must fit in available
memory (its ``min_ram_bytes``); among those that fit, the largest file wins (higher-bit
quantization means higher quality). Hardware-specific preferences extend these rules.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

from agent.errors import NoUsableVariant
from protos.fleet.release import VerifiedRelease
from protos.fleet.v1 import bundle_pb2, common_pb2


@dataclass(frozen=True, slots=True)
class Selection:
    variant: bundle_pb2.Variant
    reason: str


def select_variant(
    release: VerifiedRelease, *, supported_formats: Collection[int], available_ram_bytes: int | None
) -> Selection:
    """Returns the variant to install, or raises NoUsableVariant naming why each was skipped."""
    skipped: list[str] = []
    candidates: list[bundle_pb2.Variant] = []
    for variant in release.manifest.variants:
        fmt = common_pb2.ModelFormat.Name(variant.format)
        if variant.format not in supported_formats:
            skipped.append(f"{variant.id}: no runtime for {fmt} on this device")
        elif available_ram_bytes is not None and variant.min_ram_bytes > available_ram_bytes:
            skipped.append(
                f"{variant.id}: needs {variant.min_ram_bytes} bytes of RAM, {available_ram_bytes} available"
            )
        else:
            candidates.append(variant)
    if not candidates:
        raise NoUsableVariant(f"no variant of {release.name}@{release.version} fits: " + "; ".join(skipped))
    best = max(candidates, key=lambda v: v.size_bytes)
    reason = (
        f"{best.id} ({common_pb2.ModelFormat.Name(best.format)} {best.quantization}): "
        f"largest of {len(candidates)} variant(s) that fit"
    )
    if skipped:
        reason += "; skipped " + "; ".join(skipped)
    return Selection(variant=best, reason=reason)
