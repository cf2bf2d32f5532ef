"""StreamDrain's wrapper around a server-streaming handler: a client that goes away ends the
inner stream (and so its subscriptions) cleanly, and a drain ends it UNAVAILABLE."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest

from edgefleet.controlplane.app.drain import SHUTTING_DOWN, StreamDrain


class Aborted(Exception):
    pass


class Context:
    """What the wrapper uses of a ServicerContext: abort."""

    def __init__(self) -> None:
        self.aborted: tuple[grpc.StatusCode, str] | None = None

    async def abort(self, code: grpc.StatusCode, details: str) -> None:
        self.aborted = (code, details)
        raise Aborted


class Watch:
    """A desired-state stream: one message, then waits for ever; records how it ended."""

    def __init__(self) -> None:
        self.closed = asyncio.Event()

    async def __call__(self, request: Any, context: Any) -> AsyncIterator[str]:
        try:
            yield "generation 1"
            await asyncio.Event().wait()
            yield "never"
        finally:
            self.closed.set()


async def test_a_client_that_goes_away_ends_the_inner_stream() -> None:
    watch = Watch()
    wrapped = StreamDrain()._drained(watch)  # type: ignore[arg-type]
    stream = wrapped(None, Context())  # type: ignore[arg-type]
    assert await anext(stream) == "generation 1"
    waiting = asyncio.ensure_future(anext(stream))
    await asyncio.sleep(0)
    waiting.cancel()  # what gRPC does to the handler when the call is cancelled
    with pytest.raises(asyncio.CancelledError):
        await waiting
    await asyncio.wait_for(watch.closed.wait(), 5)


async def test_a_drain_ends_the_stream_unavailable() -> None:
    drain, watch, context = StreamDrain(), Watch(), Context()
    stream = drain._drained(watch)(None, context)  # type: ignore[arg-type]
    assert await anext(stream) == "generation 1"
    waiting = asyncio.ensure_future(anext(stream))
    await asyncio.sleep(0)
    drain.begin()
    with pytest.raises(Aborted):
        await waiting
    assert context.aborted == (grpc.StatusCode.UNAVAILABLE, SHUTTING_DOWN)
    await asyncio.wait_for(watch.closed.wait(), 5)
