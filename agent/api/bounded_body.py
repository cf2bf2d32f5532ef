"""The route class of every endpoint with a body: the body is read within its time limit and its
JSON depth checked before FastAPI parses it.

FastAPI reads the body itself (and `FastAPI(max_body_size=...)` bounds its bytes while it
does), but it would wait for a trickling body forever and hand any nesting to a recursive
JSON parser. Reading it here first, on the same Request, costs nothing: Starlette caches
the body, and FastAPI's own handler then parses the cached bytes.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi.routing import APIRoute
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response

from edgefleet.agent.api.deps import request_limits
from edgefleet.agent.api.disconnect import ClientDisconnected
from edgefleet.agent.api.limits import BodyTimeout, check_json_depth


class BoundedBodyRoute(APIRoute):
    """APIRoute with the body bounded in time and nesting (bytes: by FastAPI's max_body_size)."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        parse_and_run = super().get_route_handler()

        async def handler(request: Request) -> Response:
            limits = request_limits(request)
            try:
                async with asyncio.timeout(limits.body_timeout_seconds):
                    body = await request.body()
            except TimeoutError as exc:
                raise BodyTimeout.after(limits.body_timeout_seconds) from exc
            except ClientDisconnect as exc:
                raise ClientDisconnected from exc
            check_json_depth(body, limits.max_json_depth)
            return await parse_and_run(request)

        return handler
