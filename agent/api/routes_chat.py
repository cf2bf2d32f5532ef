"""Router for POST /v1/chat/completions."""

from __future__ import annotations

from fastapi import APIRouter, Depends
from starlette.responses import Response

from agent.api.deps import chat_serving
from agent.api.protocol import ChatCompletionRequest, ChatCompletionResponse, ErrorResponse
from agent.api.serving_chat import ServingChat

router = APIRouter()


@router.post(
    "/v1/chat/completions",
    response_model=None,
    responses={
        200: {"model": ChatCompletionResponse, "content": {"text/event-stream": {}}},
        400: {"model": ErrorResponse},
        404: {"model": ErrorResponse},
        503: {"model": ErrorResponse},
    },
)
async def create_chat_completion(
    request: ChatCompletionRequest, serving: ServingChat = Depends(chat_serving)
) -> Response:
    return await serving.handle(request)
