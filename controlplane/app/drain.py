"""Ends server-streaming calls (device desired-state and artifact streams) when the control
plane begins to shut down, with UNAVAILABLE: the status agents reconnect on, to another replica.

``grpc.aio.Server.stop(grace)`` lets calls in flight run for ``grace`` seconds and then cancels
them; a desired-state stream never ends on its own, so it would hold the whole grace and then
end CANCELLED. Wrapping every server-streaming handler lets ``begin`` end them at once while
unary calls still get their grace.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

SHUTTING_DOWN = "the control plane is shutting down; reconnect"


class StreamDrain(grpc.aio.ServerInterceptor):
    """A server interceptor; ``begin()`` ends every server-streaming call it wrapped."""

    def __init__(self) -> None:
        self._draining = asyncio.Event()

    def begin(self) -> None:
        self._draining.set()

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = await continuation(handler_call_details)
        if handler is None or handler.request_streaming or not handler.response_streaming:
            return handler
        inner = handler.unary_stream
        if not inspect.isasyncgenfunction(inner):
            return handler
        return grpc.unary_stream_rpc_method_handler(
            self._drained(inner),
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )

    def _drained(
        self, inner: Callable[[Any, grpc.aio.ServicerContext[Any, Any]], AsyncIterator[Any]]
    ) -> Callable[[Any, grpc.aio.ServicerContext[Any, Any]], AsyncIterator[Any]]:
        draining = self._draining

        async def handler(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
            responses = inner(request, context)
            stop = asyncio.ensure_future(draining.wait())
            following: asyncio.Future[Any] | None = None
            try:
                while True:
                    following = asyncio.ensure_future(anext(responses))
                    await asyncio.wait({following, stop}, return_when=asyncio.FIRST_COMPLETED)
                    if following.done():
                        try:
                            item = following.result()
                        except StopAsyncIteration:
                            return
                        yield item
                        continue
                    following.cancel()
                    await asyncio.wait({following})
                    await context.abort(grpc.StatusCode.UNAVAILABLE, SHUTTING_DOWN)
            finally:
                stop.cancel()
                if following is not None and not following.done():
                    # The call was cancelled (the client went away) while the handler waited
                    # on it: end the inner stream, and so its subscriptions, before closing it.
                    following.cancel()
                    await asyncio.wait({following})
                await responses.aclose()  # type: ignore[attr-defined]

        return handler
