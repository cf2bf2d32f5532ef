"""Director metadata of many devices at once (``Repositories.assign_many``): what each device
is to be told, its repository's advisory locks taken in one statement, every device's latest
versions read in one query, and the signed metadata of all of them stored in one bulk insert.

Signing stays per device, in ``Repositories``; this module only moves rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import func, insert, text
from sqlmodel import Session, col, select
from tuf.api.metadata import Metadata
from tuf.api.serialization.json import JSONSerializer

from edgefleet.controlplane.store.models import TufMetadata, utcnow
from edgefleet.protos.fleet.v1 import common_pb2

# Namespace (first key) of the per-repository advisory locks (``lock_repositories`` and
# ``repositories.lock_repository``); the second key is the hash of the repository and device.
# Any constant works, the same in every control plane.
REPOSITORY_LOCK_NAMESPACE = 0x65647475  # "edtu"
_IN_CHUNK = 5000  # ids per IN list: well under SQLite's and PostgreSQL's bound-parameter limits


@dataclass(frozen=True, slots=True)
class Assignment:
    """What one device's director targets are to say (``Repositories.assign_many``)."""

    device_id: str
    generation: int
    releases: Sequence[tuple[str, int]]
    pin: common_pb2.VariantPin | None = None
    config: common_pb2.DeviceConfig | None = None


def serialize(metadata: Metadata[Any]) -> bytes:
    """Metadata as stored and served: compact canonical-order JSON."""
    return metadata.to_bytes(JSONSerializer(compact=True))


def latest_versions(session: Session, repo: str, device_ids: Sequence[str]) -> dict[tuple[str, str], int]:
    """The latest stored version of every role of each device's repository, in one query per
    _IN_CHUNK devices; a role never signed is missing."""
    latest: dict[tuple[str, str], int] = {}
    for start in range(0, len(device_ids), _IN_CHUNK):
        chunk = list(device_ids[start : start + _IN_CHUNK])
        rows = session.exec(
            select(TufMetadata.device_id, TufMetadata.role, func.max(TufMetadata.version))
            .where(TufMetadata.repository == repo, col(TufMetadata.device_id).in_(chunk))
            .group_by(col(TufMetadata.device_id), col(TufMetadata.role))
        ).all()
        latest.update({(device_id, role): version for device_id, role, version in rows})
    return latest


def store_many(
    session: Session, repo: str, device_ids: Sequence[str], signed: Sequence[Metadata[Any]]
) -> None:
    """Stores signed metadata (``signed[i]`` of ``device_ids[i]``'s repository) in one bulk insert."""
    session.flush()
    now = utcnow()
    session.execute(
        insert(TufMetadata.__table__),  # type: ignore[attr-defined]
        [
            {
                "repository": repo,
                "device_id": device_id,
                "role": metadata.signed.type,
                "version": metadata.signed.version,
                "data": serialize(metadata),
                "expires_at": metadata.signed.expires,
                "created_at": now,
            }
            for device_id, metadata in zip(device_ids, signed, strict=True)
        ],
    )


def lock_repositories(session: Session, repo: str, device_ids: Sequence[str]) -> None:
    """``lock_repository`` for each device in one statement: the locks are taken in the order
    of the sorted ids, so two batches sharing devices wait for each other rather than deadlock."""
    if not device_ids or session.get_bind().dialect.name != "postgresql":
        return
    session.execute(
        text(
            "SELECT count(pg_advisory_xact_lock(:namespace, hashtext(:repo || '/' || device_id))) "
            "FROM unnest(CAST(:device_ids AS text[])) AS listed(device_id)"
        ),
        {"namespace": REPOSITORY_LOCK_NAMESPACE, "repo": repo, "device_ids": sorted(set(device_ids))},
    )
