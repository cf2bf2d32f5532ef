"""Enrollment tokens and operator tokens: the rows that grant access, stored only as hashes.

Queries only; what a token grants and who may create one is the fleet's (``fleet.rbac``,
``fleet.access``).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import timedelta

from sqlalchemy import update
from sqlmodel import Session, col, select

from edgefleet.controlplane.store.errors import TokenRejected
from edgefleet.controlplane.store.models import EnrollmentToken, OperatorToken, utcnow


def create_token(
    session: Session, *, token_sha256: str, uses: int, ttl: timedelta, labels: dict[str, str]
) -> EnrollmentToken:
    row = EnrollmentToken(
        token_sha256=token_sha256, uses_left=uses, expires_at=utcnow() + ttl, labels=dict(labels)
    )
    session.add(row)
    return row


def consume_token(session: Session, *, token_sha256: str) -> EnrollmentToken:
    """Uses one enrollment of a token, atomically, so two devices cannot share a single-use token."""
    table = EnrollmentToken.__table__  # type: ignore[attr-defined]
    result = session.execute(
        update(table)
        .where(table.c.token_sha256 == token_sha256)
        .where(table.c.uses_left > 0)
        .where(table.c.expires_at > utcnow())
        .values(uses_left=table.c.uses_left - 1)
    )
    if result.rowcount != 1:  # type: ignore[attr-defined]
        row = session.get(EnrollmentToken, token_sha256)
        if row is None:
            raise TokenRejected("unknown enrollment token")
        if row.uses_left <= 0:
            raise TokenRejected("enrollment token has already been used")
        raise TokenRejected("enrollment token has expired")
    row = session.get(EnrollmentToken, token_sha256)
    assert row is not None
    return row


def get_operator(session: Session, *, name: str) -> OperatorToken | None:
    return session.get(OperatorToken, name)


def add_operator(session: Session, *, name: str, token_sha256: str, role: str) -> OperatorToken:
    row = OperatorToken(name=name, token_sha256=token_sha256, role=role)
    session.add(row)
    session.flush()
    return row


def operator_with_token(session: Session, *, token_sha256: str) -> OperatorToken | None:
    return session.exec(select(OperatorToken).where(OperatorToken.token_sha256 == token_sha256)).first()


def has_operators(session: Session) -> bool:
    return session.exec(select(OperatorToken).limit(1)).first() is not None


def list_operators(
    session: Session, *, after: str | None = None, limit: int | None = None
) -> Sequence[OperatorToken]:
    """Operators by name, from the one after ``after`` on."""
    query = select(OperatorToken)
    if after is not None:
        query = query.where(col(OperatorToken.name) > after)
    query = query.order_by(col(OperatorToken.name))
    return session.exec(query if limit is None else query.limit(limit)).all()
