"""Router for POST /v1/completions."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from starlette.responses import Response

from edgefleet.agent.api.bounded_body import BoundedBodyRoute
from edgefleet.agent.api.deps import completion_serving
from edgefleet.agent.api.openapi import MODEL_ERRORS, json_or_stream
from edgefleet.agent.api.protocol import CompletionRequest, CompletionResponse
from edgefleet.agent.api.serving_completion import ServingCompletion

router = APIRouter(route_class=BoundedBodyRoute)


@router.post(
    "/v1/completions",
    response_model=None,
    responses={
        200: json_or_stream(
            CompletionResponse,
            CompletionResponse,
            "The completion, or with stream=true text_completion events",
        ),
        **MODEL_ERRORS,
    },
)
async def create_completion(
    request: CompletionRequest, raw: Request, serving: ServingCompletion = Depends(completion_serving)
) -> Response:
    return await serving.handle(request, raw)
