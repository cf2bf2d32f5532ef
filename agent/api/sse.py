"""Server-sent events as OpenAI streams them: `data: <json>\\n\\n` ..., then `data: [DONE]`."""

from __future__ import annotations

from collections.abc import AsyncGenerator

import anyio
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

DONE = "data: [DONE]\n\n"


def event(payload_json: str) -> str:
    return f"data: {payload_json}\n\n"


class EventStreamResponse(StreamingResponse):
    """A streaming response that always notices a departed client and closes its generator.

    Starlette only watches for `http.disconnect` on older ASGI spec versions; here it is
    watched always, and the event generator is closed deterministically, so its cleanup
    (which stops the model) runs as soon as the client goes away.
    """

    def __init__(self, events: AsyncGenerator[str, None]) -> None:
        super().__init__(
            events,
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
        self._events = events

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            async with anyio.create_task_group() as group:

                async def stream() -> None:
                    await self.stream_response(send)
                    group.cancel_scope.cancel()

                group.start_soon(stream)
                await self.listen_for_disconnect(receive)
                group.cancel_scope.cancel()
        except* OSError:
            pass  # the client hung up while we were writing to it
        finally:
            await self._events.aclose()
