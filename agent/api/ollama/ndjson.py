"""Newline-delimited JSON streams, as Ollama sends them: one JSON object per line, no trailer.

Like the OpenAI side's event streams (edgefleet.agent.api.sse), a departed client is noticed
whatever the ASGI version, and the line generator is closed at once, so its cleanup (which
stops the model) runs within a token.
"""

from __future__ import annotations

import json
from collections.abc import AsyncGenerator
from typing import Any

import anyio
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

MEDIA_TYPE = "application/x-ndjson"


def line(payload: dict[str, Any]) -> str:
    """One object as one line (JSON escapes every newline inside strings, so it stays one line)."""
    return json.dumps(payload, ensure_ascii=False, separators=(",", ":")) + "\n"


class NDJSONResponse(StreamingResponse):
    """A streaming response of JSON lines that stops its generator when the client leaves."""

    def __init__(self, lines: AsyncGenerator[str, None]) -> None:
        super().__init__(
            lines, media_type=MEDIA_TYPE, headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        )
        self._lines = lines

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
            await self._lines.aclose()
