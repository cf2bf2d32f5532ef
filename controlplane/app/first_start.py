"""What a control plane writes into the database at start (both repositories' roots from the
key directory, the first operator), done by one replica at a time, and the check that this
replica's keys can sign for the roots the database holds.

Replicas started together on an empty database would otherwise each store root 1, and all but
one fail on the primary key or with a refused root version. On PostgreSQL the work runs in one
transaction holding an advisory lock (as migrations do, store/migrate.py): the others wait, then
find the roots and the operator there and store nothing.
"""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import text
from sqlmodel import Session

from edgefleet.controlplane.fleet.rbac import bootstrap_admin
from edgefleet.controlplane.trust.keys import KeysMissing
from edgefleet.controlplane.trust.repositories import Repositories
from edgefleet.protos.fleet.uptane import DIRECTOR, IMAGE

# Any constant works, the same in every control plane, distinct from the migration and
# rollout locks.
FIRST_START_LOCK_KEY = 0x6564676573746172  # "edgestar"
ONLINE_ROLES = {IMAGE: ("snapshot", "timestamp"), DIRECTOR: ("targets", "snapshot", "timestamp")}


class KeysDoNotMatch(Exception):
    """This replica's online keys cannot sign for the roots stored in the database."""


def first_start(session: Session, repositories: Repositories, *, data_dir: Path) -> Path | None:
    """Stores the roots the database lacks and creates the first operator, under the
    first-start lock; returns the admin token file when it created the operator. Raises
    KeysDoNotMatch when the key directory lacks the online keys the stored roots name."""
    if session.get_bind().dialect.name == "postgresql":
        session.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": FIRST_START_LOCK_KEY})
    repositories.bootstrap(session)
    check_online_keys(session, repositories)
    return bootstrap_admin(session, data_dir=data_dir)


def check_online_keys(session: Session, repositories: Repositories) -> None:
    """Every role the control plane signs online has its threshold of keys here."""
    for repo, roles in ONLINE_ROLES.items():
        root = repositories.root(session, repo)
        for role in roles:
            try:
                repositories.keys.signers(repo, role, root=root)
            except KeysMissing as exc:
                raise KeysDoNotMatch(
                    f"the online keys in {repositories.keys.path} do not match the {repo} root "
                    f"version {root.version} in the database ({exc})"
                ) from exc
