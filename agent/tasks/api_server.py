"""The local OpenAI-compatible API's socket and server, and how it stops.

The socket is bound before anything else starts, so a taken port is the first thing the agent
finds out, as one ``ApiAddressUnavailable`` naming the address. The server runs as one task of
the agent's task group; stopping it closes the listening socket, lets responses in progress
finish for ``grace_seconds`` and then cancels them: a cancelled request stops its generation
within a token (edgefleet.agent.api.offload.TokenPump), so an in-flight stream of many tokens
does not hold the stop until the process deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import socket
from collections.abc import Generator

import uvicorn
from starlette.types import ASGIApp

from edgefleet.agent.tasks.supervise import TaskEnded

STOP_MARGIN_SECONDS = 2.0
"""Beyond the grace: how long the server gets to close connections before its task is cancelled."""


class ApiAddressUnavailable(OSError):
    """The local API's address cannot be bound (taken, or not an address of this host)."""


def bind_api_socket(host: str, port: int) -> socket.socket:
    """The local API's listening socket, bound before anything else so the port is known.

    proto=IPPROTO_TCP, not 0: asyncio turns Nagle off (TCP_NODELAY) only on connections whose
    socket says it is TCP, and with Nagle on, the first streamed token waits out the client's
    delayed ACK (about 40 ms) behind the response headers.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        error = ApiAddressUnavailable(f"cannot listen on {host}:{port} (--listen): {exc.strerror or exc}")
        error.errno = exc.errno
        raise error from exc
    sock.set_inheritable(True)
    return sock


class _AgentOwnedSignals(uvicorn.Server):
    """uvicorn without its SIGTERM/SIGINT handlers: the agent owns the stop
    (edgefleet.agent.tasks.signals) and stops the API through ``ApiServer.stop``. Were uvicorn to
    hear a signal itself, it would stop the API alone and leave the rest of the agent running."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


class ApiServer:
    """uvicorn serving an app on a bound socket, as a task of the agent's task group."""

    def __init__(self, app: ASGIApp, sock: socket.socket, *, grace_seconds: float) -> None:
        # h11 named, not left to "auto": the framing guard and limits are tested against it, and
        # installing httptools must not change how the device parses requests.
        config = uvicorn.Config(
            app,
            log_level="warning",
            access_log=False,
            lifespan="off",
            http="h11",
            timeout_graceful_shutdown=math.ceil(grace_seconds),  # uvicorn takes whole seconds
        )
        self._server = _AgentOwnedSignals(config)
        self._sock = sock
        self._grace_seconds = grace_seconds
        self._task: asyncio.Task[None] | None = None

    def start(self, group: asyncio.TaskGroup) -> None:
        self._task = group.create_task(self._serve(), name="api")

    async def _serve(self) -> None:
        await self._server.serve(sockets=[self._sock])
        if not self._server.should_exit:
            raise TaskEnded("api")  # nothing asked it to stop: the device would serve nothing

    async def stop(self) -> None:
        """Stops taking connections and ends the responses in progress (after the grace); the
        task group cancels the server if it takes longer. Idempotent."""
        self._server.should_exit = True
        task = self._task
        if task is not None and not task.done():
            await asyncio.wait({task}, timeout=self._grace_seconds + STOP_MARGIN_SECONDS)
