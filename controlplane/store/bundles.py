"""Bundles: verified releases as pushed, looked up by name and version, listed in that order."""

from __future__ import annotations

import json
from collections.abc import Sequence

from sqlalchemy import and_, or_
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, select

from edgefleet.controlplane.store.errors import BundleExists, BundleNotFound
from edgefleet.controlplane.store.models import Bundle, BundleArtifact
from edgefleet.protos.fleet.release import VerifiedRelease, manifest_to_json


def add_bundle(session: Session, *, release: VerifiedRelease) -> tuple[Bundle, bool]:
    """Records a verified release; returns (bundle, already_present). Same bytes twice is idempotent."""
    existing = get_bundle(session, name=release.name, version=release.version, missing_ok=True)
    if existing is not None:
        if existing.release_metadata != release.metadata:
            raise BundleExists(
                f"{release.name}@{release.version} already exists with different metadata; "
                "push a higher version instead"
            )
        return existing, True
    bundle = Bundle(
        name=release.name,
        version=release.version,
        release_metadata=release.metadata,
        manifest_json=json.dumps(manifest_to_json(release.manifest)),
        expires_at=release.expires,
        total_bytes=sum(a.length for a in release.artifacts.values()),
    )
    session.add(bundle)
    try:
        session.flush()
    except IntegrityError as exc:
        raise BundleExists(f"{release.name}@{release.version} was pushed concurrently") from exc
    assert bundle.id is not None
    for info in release.artifacts.values():
        session.add(
            BundleArtifact(bundle_id=bundle.id, path=info.path, sha256=info.sha256, length=info.length)
        )
    return bundle, False


def get_bundle(session: Session, *, name: str, version: int, missing_ok: bool = False) -> Bundle | None:
    bundle = session.exec(select(Bundle).where(Bundle.name == name, Bundle.version == version)).first()
    if bundle is None and not missing_ok:
        raise BundleNotFound(f"no bundle {name}@{version}; push it first")
    return bundle


def list_bundles(
    session: Session, *, after: tuple[str, int] | None = None, limit: int | None = None
) -> Sequence[Bundle]:
    """Bundles by name and version, from the one after (name, version) ``after`` on."""
    query = select(Bundle)
    if after is not None:
        name, version = after
        query = query.where(
            or_(col(Bundle.name) > name, and_(col(Bundle.name) == name, col(Bundle.version) > version))
        )
    query = query.order_by(col(Bundle.name), col(Bundle.version))
    return session.exec(query if limit is None else query.limit(limit)).all()
