"""Refuse requests whose body framing is ambiguous, and bodies announced too large, from headers alone.

A request carrying both Transfer-Encoding and Content-Length (or two different lengths, or
a transfer coding other than chunked) is read one way by this server and possibly another
by a proxy in front of it: the classic request-smuggling shape. RFC 9112 §6.1 says such a
message may be answered, but the connection must then be closed. uvicorn's h11 parser lets
chunked win and keeps the connection open (its httptools parser refuses, but either may be
in use), so this guard runs first, ahead of every middleware (authentication included),
on the headers the server parsed: it answers 400 with `Connection: close`, which both of
uvicorn's HTTP implementations honour by closing once the response is sent. A body whose
Content-Length is over the limit gets 413 the same way, before a byte of it is read, and
any response sent before its request body was read to the end closes the connection too.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from edgefleet.agent.api.errors import CLOSE, APIError, api_error_for
from edgefleet.agent.api.limits import BodyTooLarge

_LENGTH = re.compile(rb"[0-9]+")
_LENGTH_DIGITS = 18  # more digits than this is no body this API would take (nor int() parse cheaply)


class FramingGuard:
    """Plain ASGI, outermost: checks the framing headers of every HTTP request."""

    def __init__(self, app: ASGIApp, *, max_body_bytes: int) -> None:
        self.app = app
        self._max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        refusal = self.refusal(scope["headers"])
        if refusal is not None:
            await refusal.response()(scope, receive, send)
            return
        if not _has_body(scope["headers"]):
            await self.app(scope, receive, send)
            return
        # A response sent before the body was read to its end (a 401, a 404, a 413) closes the
        # connection: otherwise the server would keep reading, and discarding, whatever the
        # client still sends, for as long as it sends it.
        body_read = False

        async def receive_watched() -> Message:
            nonlocal body_read
            message = await receive()
            if message["type"] == "http.request" and not message.get("more_body", False):
                body_read = True
            return message

        async def send_closing(message: Message) -> None:
            if message["type"] == "http.response.start" and not body_read:
                headers = list(message.get("headers", ()))
                if not any(name.lower() == b"connection" for name, _ in headers):
                    message = {**message, "headers": [*headers, (b"connection", b"close")]}
            await send(message)

        await self.app(scope, receive_watched, send_closing)

    def refusal(self, headers: Iterable[tuple[bytes, bytes]]) -> APIError | None:
        """The error to answer with, or None when the framing is sound."""
        codings: list[bytes] = []
        lengths: list[bytes] = []
        for name, value in headers:
            name = name.lower()
            if name == b"transfer-encoding":
                codings.extend(part.strip().lower() for part in value.split(b","))
            elif name == b"content-length":
                lengths.extend(part.strip() for part in value.split(b","))
        if codings and lengths:
            return _bad_framing("the request has both Transfer-Encoding and Content-Length (RFC 9112 §6.1)")
        if codings and codings != [b"chunked"]:
            return _bad_framing("the only Transfer-Encoding accepted is a single 'chunked'")
        if not lengths:
            return None
        if len(set(lengths)) != 1 or _LENGTH.fullmatch(lengths[0]) is None:
            return _bad_framing("the request has an invalid or conflicting Content-Length")
        length = lengths[0]
        if len(length) > _LENGTH_DIGITS or int(length) > self._max_body_bytes:
            return api_error_for(BodyTooLarge.over(self._max_body_bytes))
        return None


def _has_body(headers: Iterable[tuple[bytes, bytes]]) -> bool:
    """Whether the (sound) framing headers announce a body: chunked, or a non-zero length."""
    for name, value in headers:
        name = name.lower()
        if name == b"transfer-encoding" or (name == b"content-length" and value.strip(b" 0")):
            return True
    return False


def _bad_framing(message: str) -> APIError:
    return APIError(400, f"{message}; the connection is closed", code="invalid_framing", headers=CLOSE)
