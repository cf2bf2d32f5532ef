"""Who may do what: bootstrap tokens devices enroll with, operators and their tokens, and the
roots of the trust repositories. Each command is one transaction that makes the change and
records it in the audit trail.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import timedelta

from sqlmodel import Session

from edgefleet.controlplane.fleet import audit, rbac
from edgefleet.controlplane.fleet.audit import Outcome
from edgefleet.controlplane.fleet.rbac import Role
from edgefleet.controlplane.store import access
from edgefleet.controlplane.store.models import EnrollmentToken
from edgefleet.controlplane.trust.repositories import Repositories


def create_token(
    session: Session, *, actor: str, token_sha256: str, uses: int, ttl: timedelta, labels: Mapping[str, str]
) -> EnrollmentToken:
    """Stores a bootstrap token (its hash) good for ``uses`` enrollments within ``ttl``; devices
    enrolling with it get ``labels``."""
    row = access.create_token(session, token_sha256=token_sha256, uses=uses, ttl=ttl, labels=dict(labels))
    audit.record(
        session,
        actor=actor,
        action="token.create",
        target=f"token:{token_sha256[:12]}",
        detail={"uses": uses, "ttl_seconds": int(ttl.total_seconds()), "labels": dict(labels)},
    )
    return row


def create_operator(session: Session, *, actor: str, name: str, role: Role) -> str:
    """Creates an operator; returns its token. Raises InvalidOperatorName or OperatorExists."""
    token = rbac.create_operator(session, name=name, role=role)
    audit.record(
        session, actor=actor, action="operator.create", target=name, detail={"role": role.name.lower()}
    )
    return token


def revoke_operator(session: Session, *, actor: str, name: str) -> bool:
    """Revokes an operator's token; False (audited as refused) when there was none to revoke."""
    done = rbac.revoke_operator(session, name=name)
    audit.record(
        session,
        actor=actor,
        action="operator.revoke",
        target=name,
        outcome=Outcome.OK if done else Outcome.REFUSED,
    )
    return done


def push_root(
    session: Session, repositories: Repositories, *, actor: str, repository: str, root: bytes
) -> int:
    """Makes ``root`` the repository's next root; returns its version. Raises
    RepositoryRefusal or KeyStoreError."""
    version = repositories.push_root(session, repository, root)
    audit.record(session, actor=actor, action="root.push", target=f"{repository}:{version}")
    return version
