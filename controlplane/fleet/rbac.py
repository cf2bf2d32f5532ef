"""Operator access: API tokens carrying one of three roles.

viewer reads; operator also publishes bundles and deploys; admin also manages bootstrap
tokens, keys (roots) and operators. The first start creates an ``admin`` token and writes it,
owner-readable, to the data directory, so nobody is locked out and nothing is open.

Tokens are stored only as hashes (``secret_sha256``): a leaked database grants nothing. Which
call needs which role is the API's (``api.auth.authorize``); this module knows no transport.
"""

from __future__ import annotations

import enum
import hashlib
import re
import secrets
from dataclasses import dataclass
from pathlib import Path

from sqlmodel import Session

from edgefleet.controlplane.fleet.errors import InvalidOperatorName, OperatorExists
from edgefleet.controlplane.store import access
from edgefleet.controlplane.store.models import utcnow
from edgefleet.protos.fleet.fsio import atomic_write_bytes

ADMIN_TOKEN_FILE = "admin.token"
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$")
MAX_TOKEN_CHARS = 256


def secret_sha256(secret: str) -> str:
    """Only hashes of tokens are stored; a leaked database grants nothing."""
    return hashlib.sha256(secret.encode()).hexdigest()


def new_secret() -> str:
    return secrets.token_urlsafe(32)


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


def create_operator(session: Session, *, name: str, role: Role) -> str:
    """Creates an operator and returns its token (shown once, stored only as a hash)."""
    if not NAME_PATTERN.fullmatch(name):
        raise InvalidOperatorName(
            f"operator name {name!r} must be 1-64 letters, digits, '.', '_', '@' or '-'"
        )
    if access.get_operator(session, name=name) is not None:
        raise OperatorExists(f"operator {name!r} already exists")
    token = new_secret()
    access.add_operator(session, name=name, token_sha256=secret_sha256(token), role=role.name.lower())
    return token


def revoke_operator(session: Session, *, name: str) -> bool:
    row = access.get_operator(session, name=name)
    if row is None or row.revoked_at is not None:
        return False
    row.revoked_at = utcnow()
    session.add(row)
    return True


def bootstrap_admin(session: Session, *, data_dir: Path) -> Path | None:
    """On an empty store, creates the ``admin`` operator and writes its token file."""
    if access.has_operators(session):
        return None
    token = create_operator(session, name="admin", role=Role.ADMIN)
    path = data_dir / ADMIN_TOKEN_FILE
    atomic_write_bytes(path, (token + "\n").encode(), mode=0o600)
    return path


def identify(session: Session, *, token: str) -> OperatorIdentity | None:
    """The unrevoked operator ``token`` belongs to, or None (also for an oversized token)."""
    if len(token) > MAX_TOKEN_CHARS:
        return None
    row = access.operator_with_token(session, token_sha256=secret_sha256(token))
    if row is None or row.revoked_at is not None:
        return None
    return OperatorIdentity(name=row.name, role=Role.parse(row.role))
