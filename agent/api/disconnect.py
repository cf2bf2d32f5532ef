"""Stop work the client no longer waits for.

Starlette does not cancel a handler when its client goes away: a non-streamed request
would keep the model busy to the last token, and a request waiting in the queue would
hold its place. Work that runs before the response starts is therefore raced against the
ASGI `http.disconnect` message (streams watch for it themselves, see `sse`).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable
from typing import TypeVar

from starlette.requests import Request

T = TypeVar("T")

CLIENT_CLOSED_REQUEST = 499  # nginx's status for "the client left first"; never reaches a client


class ClientDisconnected(Exception):
    """The client closed the connection before the response started."""


async def wait_for_disconnect(request: Request) -> None:
    """Return once the client is gone (the body has been read already, so nothing else arrives)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Await `work`; cancel it and raise ClientDisconnected if the client leaves first."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(wait_for_disconnect(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    if task.cancelled():
        raise ClientDisconnected
    return task.result()
