"""Publishing what devices may install: a pushed release with the image targets that list
it, and image targets re-signed on their own. Each command is one transaction that records
the release or the targets and the audit entry together.
"""

from __future__ import annotations

from sqlmodel import Session

from edgefleet.controlplane.fleet import audit
from edgefleet.controlplane.store import bundles
from edgefleet.controlplane.trust.repositories import Repositories
from edgefleet.protos.fleet.release import VerifiedRelease


def publish_bundle(
    session: Session,
    repositories: Repositories,
    *,
    actor: str,
    release: VerifiedRelease,
    image_targets: bytes,
) -> bool:
    """Records a verified release whose artifacts are stored, and publishes ``image_targets``
    listing it; returns whether the same release was already present (then nothing changes).
    Raises BundleExists or RepositoryRefusal."""
    _, present = bundles.add_bundle(session, release=release)
    if not present:
        repositories.publish_image_targets(session, image_targets, release=release)
        audit.record(
            session,
            actor=actor,
            action="bundle.push",
            target=f"{release.name}@{release.version}",
            detail={"artifacts": {p: a.sha256 for p, a in release.artifacts.items()}},
        )
    return present


def publish_image_targets(session: Session, repositories: Repositories, *, actor: str, targets: bytes) -> int:
    """Publishes re-signed image targets; returns their version. Raises RepositoryRefusal."""
    version = repositories.publish_image_targets(session, targets, release=None)
    audit.record(session, actor=actor, action="image.resign", target=f"image-targets:{version}")
    return version
