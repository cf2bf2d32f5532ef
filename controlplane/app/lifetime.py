"""Pieces of a control-plane process whose stopping needs care: the gRPC server's ports and the
long-running tasks on the server's event loop. Each is made to be registered on an
``AsyncExitStack`` (``app.server``) so it is stopped however start-up or the process ends.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Coroutine, Sequence
from contextlib import asynccontextmanager
from typing import Any

import grpc

log = logging.getLogger(__name__)


class ServeError(Exception):
    """The control plane cannot start with these settings."""


class ListenError(ServeError):
    """A gRPC port could not be opened at ``address`` (taken, or not this host's address)."""

    def __init__(self, address: str, serves: str) -> None:
        super().__init__(
            f"cannot listen on {address} ({serves}): the port is taken or the address is not this host's"
        )
        self.address = address


class GrpcServer:
    """A ``grpc.aio`` server whose ports are released whatever happens after they are bound.

    gRPC core listens on a port as soon as ``add_secure_port`` binds it, but releases the port
    only when a *started* server shuts down: a server that fails before ``start`` (its second
    port taken, say) would keep the first one listening for the rest of the process. ``release``
    therefore starts a server that never started (it has no services yet, or incomplete ones,
    for the moment it takes) before stopping it.
    """

    def __init__(
        self, options: Sequence[tuple[str, Any]], interceptors: Sequence[grpc.aio.ServerInterceptor] = ()
    ) -> None:
        self.server = grpc.aio.server(options=options, interceptors=interceptors)
        self._started = False

    def listen(self, address: str, credentials: grpc.ServerCredentials, serves: str) -> int:
        """Binds ``address`` (port 0: any free one) and returns the port; ListenError if not."""
        try:
            port = self.server.add_secure_port(address, credentials)
        except RuntimeError as exc:  # grpc's "Failed to bind to address"
            raise ListenError(address, serves) from exc
        if port == 0:  # older grpc reports a failure this way
            raise ListenError(address, serves)
        return port

    async def start(self) -> None:
        await self.server.start()
        self._started = True

    async def release(self, grace: float | None = None) -> None:
        """Stops the server (a stopped one: nothing happens), releasing its ports."""
        if not self._started:
            await self.start()
        await self.server.stop(grace)


@asynccontextmanager
async def background(job: Coroutine[Any, Any, None], name: str) -> AsyncIterator[asyncio.Task[None]]:
    """Runs ``job`` as a task for the life of the block, then cancels it and waits for it to
    end. A task that ends on its own with an error is logged as soon as it does."""
    task = asyncio.create_task(job, name=name)
    task.add_done_callback(_log_failure)
    try:
        yield task
    finally:
        task.cancel()
        await asyncio.wait({task})


def _log_failure(task: asyncio.Task[None]) -> None:
    if task.cancelled():
        return
    exc = task.exception()
    if exc is not None:
        log.error("background task %s failed; it is not restarted", task.get_name(), exc_info=exc)
