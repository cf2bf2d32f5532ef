"""Router for POST /v1/embeddings."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from starlette.responses import Response

from agent.api.bounded_body import BoundedBodyRoute
from agent.api.deps import embedding_serving
from agent.api.openapi import MODEL_ERRORS
from agent.api.protocol import EmbeddingRequest, EmbeddingResponse
from agent.api.serving_embedding import ServingEmbedding

router = APIRouter(route_class=BoundedBodyRoute)


@router.post(
    "/v1/embeddings",
    response_model=None,
    responses={200: {"model": EmbeddingResponse, "description": "One embedding per input"}, **MODEL_ERRORS},
)
async def create_embeddings(
    request: EmbeddingRequest, raw: Request, serving: ServingEmbedding = Depends(embedding_serving)
) -> Response:
    return await serving.handle(request, raw)
