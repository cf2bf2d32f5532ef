"""Router for POST /v1/embeddings."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from starlette.responses import Response

from edgefleet.agent.api.bounded_body import BoundedBodyRoute
from edgefleet.agent.api.deps import embedding_serving
from edgefleet.agent.api.openapi import MODEL_ERRORS
from edgefleet.agent.api.protocol import EmbeddingRequest, EmbeddingResponse
from edgefleet.agent.api.serving_embedding import ServingEmbedding

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
