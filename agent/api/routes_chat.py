"""Router for POST /v1/chat/completions."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from starlette.responses import Response

from edgefleet.agent.api.bounded_body import BoundedBodyRoute
from edgefleet.agent.api.deps import chat_serving
from edgefleet.agent.api.openapi import MODEL_ERRORS, json_or_stream
from edgefleet.agent.api.protocol import ChatCompletionChunk, ChatCompletionRequest, ChatCompletionResponse
from edgefleet.agent.api.serving_chat import ServingChat

router = APIRouter(route_class=BoundedBodyRoute)


@router.post(
    "/v1/chat/completions",
    response_model=None,
    responses={
        200: json_or_stream(
            ChatCompletionResponse,
            ChatCompletionChunk,
            "The completion, or with stream=true chat.completion.chunk events",
        ),
        **MODEL_ERRORS,
    },
)
async def create_chat_completion(
    request: ChatCompletionRequest, raw: Request, serving: ServingChat = Depends(chat_serving)
) -> Response:
    return await serving.handle(request, raw)
