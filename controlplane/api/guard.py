"""One place where every call of a service is bounded, refused with a status, and audited.

Why a wrapper around every servicer method rather than care in each: an exception a handler
did not expect reached callers as ``UNKNOWN: Unexpected <class ...>`` (a release whose sha256
was not hex, a CSR with an unknown key algorithm), unaudited. Here, for each method the
service descriptor names (so a new RPC is covered without anyone remembering to):

- a peer whose refused unauthenticated calls emptied its bucket is refused at once with
  RESOURCE_EXHAUSTED and retry info (``ratelimit``);
- the request is checked against the generic bounds (``limits.check_request``);
- a typed error the refusal table lists (``refusals.STATUS_CODES``: the API's own refusals,
  the domain's, the rollouts') becomes its status code, with details cut to MAX_ERROR_CHARS,
  and is audited: an operator's refusal as
  one entry; a device's or a stranger's through ``RefusalLog``, which bounds what repeats cost;
  a stranger's refusal also spends a token of its peer's bucket;
- anything else is a bug: it is logged with its traceback and the caller reads INTERNAL with
  no detail from inside.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any, NoReturn, TypeVar

import grpc
from google.protobuf.descriptor import ServiceDescriptor
from google.protobuf.message import Message

from edgefleet.controlplane.api.auth import Context
from edgefleet.controlplane.api.limits import MAX_ERROR_CHARS, check_request, clip
from edgefleet.controlplane.api.ratelimit import PeerLimiter, RateLimit, peer_key, retry_metadata
from edgefleet.controlplane.api.refusal_log import AuditRow, RefusalLog
from edgefleet.controlplane.api.refusals import CALLER, Refused, refusal_of
from edgefleet.controlplane.fleet import audit
from edgefleet.controlplane.store.database import Database

log = logging.getLogger(__name__)

S = TypeVar("S")


class CallGuard:
    """The bounds, refusals and audit of one service's calls (see the module docstring)."""

    def __init__(
        self,
        *,
        db: Database,
        rate_limit: RateLimit | None = None,
        refusal_window_seconds: float = 60.0,
    ) -> None:
        self.db = db
        self.limiter = PeerLimiter(rate_limit or RateLimit())
        self.refusals = RefusalLog(self._write, window_seconds=refusal_window_seconds)

    async def _write(self, rows: list[AuditRow]) -> None:
        def write(session: Any) -> None:
            for row in rows:
                audit.record(
                    session,
                    actor=row.actor,
                    action=row.action,
                    target=row.target,
                    outcome=row.outcome,
                    detail=row.detail,
                )

        await self.db.run(write)

    async def refuse(self, context: Context, method: str, refusal: Refused) -> NoReturn:
        """Audits ``refusal`` as its caller warrants, then fails the call with its status."""
        message = clip(refusal.message, MAX_ERROR_CHARS)
        caller = CALLER.get()
        peer = peer_key(context.peer() or "")
        action = refusal.action or f"rpc.{method}"
        target = refusal.target or method
        kind = f"{refusal.code.name}:{type(refusal).__name__}"
        if refusal.audited and caller is not None and caller.is_operator:
            row = AuditRow(caller.actor, action, target, audit.Outcome.REFUSED, {"reason": message})
            await self._write([row])
        elif refusal.audited:
            if caller is None and refusal.charges:
                self.limiter.charge(peer)
            await self.refusals.refused(
                peer=caller.actor if caller is not None else peer,
                actor=caller.actor if caller is not None else (refusal.actor or f"peer:{peer}"),
                action=action,
                target=target,
                kind=kind,
                reason=message,
            )
        await context.abort(refusal.code, message)
        raise AssertionError("context.abort returned")  # pragma: no cover

    async def admit(self, context: Context, method: str) -> None:
        """Refuses at once, without work, a peer whose bucket is empty."""
        peer = peer_key(context.peer() or "")
        wait = self.limiter.retry_after(peer)
        if not wait:
            return
        message = f"too many refused calls from {peer}; retry in {wait:.0f}s"
        await self.refusals.refused(
            peer=peer,
            actor=f"peer:{peer}",
            action=f"rpc.{method}",
            target="",
            kind="RESOURCE_EXHAUSTED:rate",
            reason="rate limited",
        )
        code = grpc.StatusCode.RESOURCE_EXHAUSTED
        await context.abort(code, message, retry_metadata(code.value[0], message, wait))

    async def failed(self, context: Context, method: str, exc: Exception) -> NoReturn:
        """A typed error becomes its refusal; anything else is a bug, logged, and INTERNAL."""
        refusal = refusal_of(exc)
        if refusal is not None:
            await self.refuse(context, method, refusal)
        log.error("%s failed unexpectedly", method, exc_info=exc)
        await context.abort(
            grpc.StatusCode.INTERNAL, f"{method} failed inside the control plane; it is logged"
        )
        raise AssertionError("context.abort returned")  # pragma: no cover


PASS_THROUGH = (grpc.aio.AbortError, asyncio.CancelledError)


def _guarded_unary(name: str, handler: Callable[..., Any], streamed_requests: bool) -> Callable[..., Any]:
    @functools.wraps(handler)
    async def call(self: Any, request: Any, context: Context) -> Any:
        guard: CallGuard = self.guard
        CALLER.set(None)
        try:
            await guard.admit(context, name)
            if streamed_requests:
                request = _checked_stream(request)
            else:
                check_request(request)
            return await handler(self, request, context)
        except PASS_THROUGH:
            raise
        except Exception as exc:
            await guard.failed(context, name, exc)

    return call


def _guarded_stream(name: str, handler: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(handler)
    async def call(self: Any, request: Any, context: Context) -> AsyncIterator[Any]:
        guard: CallGuard = self.guard
        CALLER.set(None)
        try:
            await guard.admit(context, name)
            check_request(request)
            async for reply in handler(self, request, context):
                yield reply
        except PASS_THROUGH:
            raise
        except Exception as exc:
            await guard.failed(context, name, exc)

    return call


async def _checked_stream(requests: AsyncIterator[Message]) -> AsyncIterator[Message]:
    async for request in requests:
        check_request(request)
        yield request


def guarded(service: ServiceDescriptor) -> Callable[[type[S]], type[S]]:
    """Class decorator: wraps every method ``service`` declares (the servicer sets ``guard``)."""

    def wrap(cls: type[S]) -> type[S]:
        for method in service.methods:
            handler = getattr(cls, method.name)
            if method.server_streaming:
                if not inspect.isasyncgenfunction(handler):
                    raise TypeError(f"{cls.__name__}.{method.name} must be an async generator")
                setattr(cls, method.name, _guarded_stream(method.name, handler))
            else:
                setattr(cls, method.name, _guarded_unary(method.name, handler, method.client_streaming))
        return cls

    return wrap
