"""OperatorService's access RPCs: bootstrap tokens, operators, trust roots and the audit
trail. Creating and revoking is an admin's; reading the trail a viewer's."""

from __future__ import annotations

import json
from datetime import UTC, timedelta

from sqlmodel import Session

from edgefleet.controlplane.api import pages
from edgefleet.controlplane.api.auth import Context, authorize
from edgefleet.controlplane.api.operator_parts import OperatorParts, timestamp
from edgefleet.controlplane.api.refusals import InvalidRequest
from edgefleet.controlplane.fleet import access, audit
from edgefleet.controlplane.fleet.audit import MAX_DETAIL_BYTES
from edgefleet.controlplane.fleet.rbac import Role, new_secret, secret_sha256
from edgefleet.controlplane.store.access import list_operators
from edgefleet.controlplane.store.models import AuditEntry, OperatorToken
from edgefleet.protos.fleet import selectors
from edgefleet.protos.fleet.uptane import DIRECTOR, IMAGE
from edgefleet.protos.fleet.v1 import operator_pb2

DEFAULT_TOKEN_TTL = timedelta(hours=24)
MAX_TOKEN_USES = 100_000
AUDIT = pages.PageSpec("ListAudit", default_size=100, max_size=1000)
OPERATORS = pages.PageSpec("ListOperators", default_size=100, max_size=1000)


def audit_record(r: AuditEntry) -> operator_pb2.AuditRecord:
    """One entry as listed; a detail over MAX_DETAIL_BYTES of JSON (written before entries were
    bounded) is cut to that and flagged."""
    detail = json.dumps(r.detail, sort_keys=True)
    record = operator_pb2.AuditRecord(
        seq=r.seq,
        time=timestamp(r.time),
        actor=r.actor,
        action=r.action,
        target=r.target,
        outcome=r.outcome,
        detail_json=detail,
        hash=r.hash,
    )
    if len(detail) > MAX_DETAIL_BYTES:
        record.detail_json, record.detail_truncated = detail[:MAX_DETAIL_BYTES], True
    return record


def operator_info(r: OperatorToken) -> operator_pb2.OperatorInfo:
    return operator_pb2.OperatorInfo(
        name=r.name, role=r.role, created=timestamp(r.created_at), revoked=r.revoked_at is not None
    )


class AccessRpcs(OperatorParts):
    async def CreateToken(
        self, request: operator_pb2.CreateTokenRequest, context: Context
    ) -> operator_pb2.CreateTokenResponse:
        """A bootstrap token, shown once; only its hash is stored."""
        who = await authorize(self.db, context, Role.ADMIN)
        uses = request.uses or 1
        if uses > MAX_TOKEN_USES:
            raise InvalidRequest(f"uses must be at most {MAX_TOKEN_USES}")
        try:
            selectors.check_labels(request.labels)
        except selectors.InvalidLabels as exc:
            raise InvalidRequest(str(exc)) from exc
        ttl = timedelta(seconds=request.ttl_seconds) if request.ttl_seconds else DEFAULT_TOKEN_TTL
        token = new_secret()
        digest = secret_sha256(token)
        row = await self.command(
            lambda s: access.create_token(
                s, actor=who.actor, token_sha256=digest, uses=uses, ttl=ttl, labels=request.labels
            ),
            action="token.create",
            target=f"token:{digest[:12]}",
        )
        return operator_pb2.CreateTokenResponse(token=token, expires=timestamp(row.expires_at), uses=uses)

    async def PushRoot(
        self, request: operator_pb2.PushRootRequest, context: Context
    ) -> operator_pb2.PushRootResponse:
        who = await authorize(self.db, context, Role.ADMIN)
        if request.repository not in (IMAGE, DIRECTOR):
            raise InvalidRequest("repository must be 'image' or 'director'")
        version = await self.command(
            lambda s: access.push_root(
                s, self.repositories, actor=who.actor, repository=request.repository, root=request.root
            ),
            action="root.push",
            target=request.repository,
        )
        return operator_pb2.PushRootResponse(version=version)

    async def ListAudit(
        self, request: operator_pb2.ListAuditRequest, context: Context
    ) -> operator_pb2.ListAuditResponse:
        """A page of matching entries, newest first; ``limit`` is the page size of older callers."""
        await authorize(self.db, context, Role.VIEWER)
        try:
            since = request.since.ToDatetime(tzinfo=UTC) if request.HasField("since") else None
        except (ValueError, OverflowError) as exc:
            raise InvalidRequest(f"since is not a time: {exc}") from exc
        size = AUDIT.size(request.page_size or request.limit)
        filters = {
            "actor": request.actor,
            "action": request.action,
            "target": request.target,
            "since": since.isoformat() if since else "",
        }
        before = pages.int_key(pages.decode_token(AUDIT, request.page_token, filters))

        def query(session: Session) -> pages.Page[operator_pb2.AuditRecord]:
            rows = audit.list_entries(
                session,
                actor=request.actor or None,
                action=request.action or None,
                target=request.target or None,
                since=since,
                limit=size + 1,
                before=before,
            )
            return pages.cut(
                AUDIT, rows, size=size, encode=audit_record, key=lambda r: r.seq, filters=filters
            )

        page = await self.db.run(query)
        return operator_pb2.ListAuditResponse(entries=page.items, next_page_token=page.next_page_token)

    async def VerifyAudit(
        self, request: operator_pb2.VerifyAuditRequest, context: Context
    ) -> operator_pb2.VerifyAuditResponse:
        await authorize(self.db, context, Role.VIEWER)
        result = await self.db.run(audit.verify)
        return operator_pb2.VerifyAuditResponse(
            ok=result.ok,
            entries=result.entries,
            head=result.head,
            broken_at=result.broken_at or 0,
            reason=result.reason,
        )

    async def CreateOperator(
        self, request: operator_pb2.CreateOperatorRequest, context: Context
    ) -> operator_pb2.CreateOperatorResponse:
        who = await authorize(self.db, context, Role.ADMIN)
        try:
            role = Role.parse(request.role[:32])
        except ValueError as exc:
            raise InvalidRequest(str(exc)) from exc
        token = await self.command(
            lambda s: access.create_operator(s, actor=who.actor, name=request.name, role=role),
            action="operator.create",
            target=request.name,
        )
        return operator_pb2.CreateOperatorResponse(token=token)

    async def ListOperators(
        self, request: operator_pb2.ListOperatorsRequest, context: Context
    ) -> operator_pb2.ListOperatorsResponse:
        """A page of operators by name."""
        await authorize(self.db, context, Role.ADMIN)
        size = OPERATORS.size(request.page_size)
        after = pages.str_key(pages.decode_token(OPERATORS, request.page_token, {}))

        def query(session: Session) -> pages.Page[operator_pb2.OperatorInfo]:
            rows = list_operators(session, after=after, limit=size + 1)
            return pages.cut(
                OPERATORS, rows, size=size, encode=operator_info, key=lambda r: r.name, filters={}
            )

        page = await self.db.run(query)
        return operator_pb2.ListOperatorsResponse(operators=page.items, next_page_token=page.next_page_token)

    async def RevokeOperator(
        self, request: operator_pb2.RevokeOperatorRequest, context: Context
    ) -> operator_pb2.RevokeOperatorResponse:
        who = await authorize(self.db, context, Role.ADMIN)
        revoked = await self.command(
            lambda s: access.revoke_operator(s, actor=who.actor, name=request.name),
            action="operator.revoke",
            target=request.name,
        )
        return operator_pb2.RevokeOperatorResponse(revoked=revoked)
