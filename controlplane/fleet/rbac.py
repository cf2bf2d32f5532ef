"""Operator access: API tokens carrying one of three roles.

viewer reads; operator also publishes bundles and deploys; admin also manages bootstrap
tokens, keys (roots) and operators. The first start creates an ``admin`` token and writes it,
owner-readable, to the data directory, so nobody is locked out and nothing is open.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass
from pathlib import Path

import grpc
from sqlmodel import Session, col, select

from edgefleet.controlplane.api.auth import Context, bearer_from_metadata, new_secret, secret_sha256
from edgefleet.controlplane.api.refusals import CALLER, Caller, Refused
from edgefleet.controlplane.store.database import Database
from edgefleet.controlplane.store.models import OperatorToken, utcnow
from edgefleet.protos.fleet.fsio import atomic_write_bytes

ADMIN_TOKEN_FILE = "admin.token"
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$")


class Role(enum.IntEnum):
    VIEWER = 1
    OPERATOR = 2
    ADMIN = 3

    @classmethod
    def parse(cls, name: str) -> Role:
        try:
            return cls[name.upper()]
        except KeyError as exc:
            raise ValueError(f"role must be viewer, operator or admin, got {name!r}") from exc


@dataclass(frozen=True, slots=True)
class OperatorIdentity:
    name: str
    role: Role

    @property
    def actor(self) -> str:
        return f"operator:{self.name}"


class InvalidOperatorName(ValueError):
    """An operator name outside NAME_PATTERN."""


class OperatorExists(Exception):
    """An operator with that name already exists."""


def create_operator(session: Session, *, name: str, role: Role) -> str:
    """Creates an operator and returns its token (shown once, stored only as a hash)."""
    if not NAME_PATTERN.fullmatch(name):
        raise InvalidOperatorName(
            f"operator name {name!r} must be 1-64 letters, digits, '.', '_', '@' or '-'"
        )
    if session.get(OperatorToken, name) is not None:
        raise OperatorExists(f"operator {name!r} already exists")
    token = new_secret()
    session.add(OperatorToken(name=name, token_sha256=secret_sha256(token), role=role.name.lower()))
    session.flush()
    return token


def revoke_operator(session: Session, *, name: str) -> bool:
    row = session.get(OperatorToken, name)
    if row is None or row.revoked_at is not None:
        return False
    row.revoked_at = utcnow()
    session.add(row)
    return True


def list_operators(
    session: Session, *, after: str | None = None, limit: int | None = None
) -> list[OperatorToken]:
    """Operators by name, from the one after ``after`` on."""
    query = select(OperatorToken)
    if after is not None:
        query = query.where(col(OperatorToken.name) > after)
    query = query.order_by(col(OperatorToken.name))
    return list(session.exec(query if limit is None else query.limit(limit)).all())


def bootstrap_admin(session: Session, *, data_dir: Path) -> Path | None:
    """On an empty store, creates the ``admin`` operator and writes its token file."""
    if session.exec(select(OperatorToken).limit(1)).first() is not None:
        return None
    token = create_operator(session, name="admin", role=Role.ADMIN)
    path = data_dir / ADMIN_TOKEN_FILE
    atomic_write_bytes(path, (token + "\n").encode(), mode=0o600)
    return path


def identify(session: Session, *, token: str) -> OperatorIdentity | None:
    row = session.exec(
        select(OperatorToken).where(OperatorToken.token_sha256 == secret_sha256(token))
    ).first()
    if row is None or row.revoked_at is not None:
        return None
    return OperatorIdentity(name=row.name, role=Role.parse(row.role))


MAX_TOKEN_CHARS = 256


async def authorize(db: Database, context: Context, needed: Role) -> OperatorIdentity:
    """The calling operator if its token grants ``needed`` (the call is then the operator's:
    its refusals are audited under its name); otherwise raises Refused, UNAUTHENTICATED for a
    missing or unknown token (a stranger's refusal), PERMISSION_DENIED for too small a role."""
    token = bearer_from_metadata(context)
    if not token:
        raise Refused(
            grpc.StatusCode.UNAUTHENTICATED,
            "operator token missing (EDGEFLEET_OPERATOR_TOKEN)",
            action="operator.authenticate",
        )
    identity = await db.run(lambda s: identify(s, token=token)) if len(token) <= MAX_TOKEN_CHARS else None
    if identity is None:
        raise Refused(
            grpc.StatusCode.UNAUTHENTICATED,
            "unknown or revoked operator token",
            action="operator.authenticate",
        )
    CALLER.set(Caller(actor=identity.actor, is_operator=True))
    if identity.role < needed:
        raise Refused(
            grpc.StatusCode.PERMISSION_DENIED,
            f"{identity.name} is a {identity.role.name.lower()}; this needs {needed.name.lower()}",
            action="operator.authorize",
        )
    return identity
