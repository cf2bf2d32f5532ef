"""Router for POST /v1/completions."""

from __future__ import annotations

from fastapi import APIRouter, Depends
from starlette.responses import Response

from agent.api.deps import completion_serving
from agent.api.protocol import CompletionRequest, CompletionResponse, ErrorResponse
from agent.api.serving_completion import ServingCompletion

router = APIRouter()


@router.post(
    "/v1/completions",
    response_model=None,
    responses={
        200: {"model": CompletionResponse, "content": {"text/event-stream": {}}},
        400: {"model": ErrorResponse},
        404: {"model": ErrorResponse},
        503: {"model": ErrorResponse},
    },
)
async def create_completion(
    request: CompletionRequest, serving: ServingCompletion = Depends(completion_serving)
) -> Response:
    return await serving.handle(request)
