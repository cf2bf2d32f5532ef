"""Routes of Ollama's API: /api/version, tags, ps, show, chat, generate, embed, embeddings, and
the model-management calls, which the fleet owns and this device refuses."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from starlette.responses import Response

from edgefleet.agent.api.errors import APIError
from edgefleet.agent.api.ollama import models as listing
from edgefleet.agent.api.ollama.auth import check_api_key
from edgefleet.agent.api.ollama.errors import OllamaRoute
from edgefleet.agent.api.ollama.ndjson import MEDIA_TYPE
from edgefleet.agent.api.ollama.protocol import (
    OllamaChatRequest,
    OllamaChatResponse,
    OllamaEmbeddingsRequest,
    OllamaEmbeddingsResponse,
    OllamaEmbedRequest,
    OllamaEmbedResponse,
    OllamaError,
    OllamaGenerateRequest,
    OllamaGenerateResponse,
    OllamaPsResponse,
    OllamaShowRequest,
    OllamaShowResponse,
    OllamaTagsResponse,
    OllamaVersionResponse,
)
from edgefleet.agent.api.ollama.serving import resolve
from edgefleet.agent.api.ollama.state import (
    CHAT_PATH,
    EMBED_PATH,
    EMBEDDINGS_PATH,
    GENERATE_PATH,
    OllamaState,
    ollama_state,
)
from edgefleet.agent.api.served_adapters import find_adapter

router = APIRouter(route_class=OllamaRoute, dependencies=[Depends(check_api_key)], tags=["ollama"])


def _error(description: str) -> dict[str, Any]:
    return {"model": OllamaError, "description": description}


KEY_ERROR: dict[int | str, dict[str, Any]] = {401: _error("An API key is required and was missing or wrong")}
BODY_ERRORS: dict[int | str, dict[str, Any]] = {
    **KEY_ERROR,
    400: _error("Invalid request, or an option or field this device cannot honour"),
    408: _error("The body did not arrive in time; the connection is closed"),
    413: _error("The body is over the size limit; the connection is closed"),
}
MODEL_ERRORS: dict[int | str, dict[str, Any]] = {
    **BODY_ERRORS,
    404: _error("The requested model is not on this device"),
    429: {**_error("The request queue is full"), "headers": {"Retry-After": {"schema": {"type": "string"}}}},
    500: _error("The model failed"),
    503: _error("No model is loaded (or it was just replaced)"),
}
MANAGED = {403: _error("Models on this device are managed by the fleet"), **KEY_ERROR}


def json_or_lines(model: type[Any], description: str) -> dict[str, Any]:
    """A 200 that is one JSON object (stream: false, or a load request) or JSON lines: objects of
    the same shape with done: false, then one with done: true and the figures (a failure after
    the first line is one `{"error": ...}` line)."""
    return {
        "model": model,
        "description": description,
        "content": {MEDIA_TYPE: {"schema": {"type": "string", "description": "one JSON object per line"}}},
    }


@router.get("/api/version", response_model=OllamaVersionResponse, responses=KEY_ERROR)
async def version() -> OllamaVersionResponse:
    return listing.version()


@router.get("/api/tags", response_model=OllamaTagsResponse, responses=KEY_ERROR)
async def tags(state: OllamaState = Depends(ollama_state)) -> OllamaTagsResponse:
    return listing.tags(state.models)


@router.get("/api/ps", response_model=OllamaPsResponse, responses=KEY_ERROR)
async def running(state: OllamaState = Depends(ollama_state)) -> OllamaPsResponse:
    return listing.ps(state.models)


@router.post(
    "/api/show",
    response_model=OllamaShowResponse,
    responses={**BODY_ERRORS, 404: _error("The model is not on this device")},
)
async def show(request: OllamaShowRequest, state: OllamaState = Depends(ollama_state)) -> OllamaShowResponse:
    runtime = state.models.get(resolve(state.models, request.model))
    if runtime is not None:
        return listing.show(runtime)
    adapter = find_adapter(state.models, request.model)
    if adapter is None:
        raise APIError(404, f"model '{request.model}' not found", code="model_not_found", param="model")
    return listing.show(adapter.runtime, adapter)


@router.post(
    CHAT_PATH,
    response_model=None,
    responses={200: json_or_lines(OllamaChatResponse, "The reply, or its chunks"), **MODEL_ERRORS},
)
async def chat(
    request: OllamaChatRequest, raw: Request, state: OllamaState = Depends(ollama_state)
) -> Response:
    return await state.chat.handle(request, raw)


@router.post(
    GENERATE_PATH,
    response_model=None,
    responses={200: json_or_lines(OllamaGenerateResponse, "The response, or its chunks"), **MODEL_ERRORS},
)
async def generate(
    request: OllamaGenerateRequest, raw: Request, state: OllamaState = Depends(ollama_state)
) -> Response:
    return await state.generate.handle(request, raw)


@router.post(
    EMBED_PATH,
    response_model=None,
    responses={200: {"model": OllamaEmbedResponse, "description": "One vector per input"}, **MODEL_ERRORS},
)
async def embed(
    request: OllamaEmbedRequest, raw: Request, state: OllamaState = Depends(ollama_state)
) -> Response:
    embedded = await state.embedding.embed(
        model=request.model, texts=request.texts(), options=request.sampling_options(), raw=raw, param="input"
    )
    body = OllamaEmbedResponse(
        model=embedded.model,
        embeddings=embedded.vectors,
        total_duration=embedded.total_duration,
        load_duration=embedded.load_duration,
        prompt_eval_count=embedded.prompt_tokens,
    )
    return JSONResponse(body.body())


@router.post(
    EMBEDDINGS_PATH,
    response_model=None,
    responses={
        200: {"model": OllamaEmbeddingsResponse, "description": "The prompt's vector"},
        **MODEL_ERRORS,
    },
)
async def embeddings(
    request: OllamaEmbeddingsRequest, raw: Request, state: OllamaState = Depends(ollama_state)
) -> Response:
    """The older form: one prompt, one vector (empty for an empty prompt, as in Ollama)."""
    if not request.prompt:
        return JSONResponse(OllamaEmbeddingsResponse(embedding=[]).body())
    embedded = await state.embedding.embed(
        model=request.model,
        texts=[request.prompt],
        options=request.sampling_options(),
        raw=raw,
        param="prompt",
    )
    return JSONResponse(OllamaEmbeddingsResponse(embedding=embedded.vectors[0]).body())


# --- model management: the fleet's job ----------------------------------------------------


def managed_by_fleet(action: str) -> APIError:
    """403 Forbidden: the request is understood and well formed, and this device will not do it.

    Ollama clients raise any 4xx/5xx with the body's `error` text (the CLI prints it, Open
    WebUI shows it), so the status decides only how the refusal is treated: a 5xx (501) would
    read as a server fault that retrying or another replica might fix, 404/405 as a wrong
    address or method, 401 as a missing key. 403 says the device refuses this by policy, which
    no retry changes: models arrive as signed releases the fleet deploys.
    """
    return APIError(
        403,
        f"{action} is not available: the models on this device are installed and removed by the "
        "fleet (signed releases deployed with fleetctl), not through this API",
        code="managed_by_fleet",
    )


@router.post("/api/pull", status_code=403, response_model=None, responses=MANAGED)
async def pull() -> Response:
    raise managed_by_fleet("pulling a model")


@router.post("/api/push", status_code=403, response_model=None, responses=MANAGED)
async def push() -> Response:
    raise managed_by_fleet("pushing a model")


@router.post("/api/create", status_code=403, response_model=None, responses=MANAGED)
async def create() -> Response:
    raise managed_by_fleet("creating a model")


@router.post("/api/copy", status_code=403, response_model=None, responses=MANAGED)
async def copy() -> Response:
    raise managed_by_fleet("copying a model")


@router.delete("/api/delete", status_code=403, response_model=None, responses=MANAGED)
async def delete() -> Response:
    raise managed_by_fleet("deleting a model")


@router.post("/api/blobs/{digest}", status_code=403, response_model=None, responses=MANAGED)
async def upload_blob(digest: str) -> Response:
    raise managed_by_fleet("uploading a model file")


# A HEAD answer has no body for a schema to describe, so this one stays out of /openapi.json.
@router.head("/api/blobs/{digest}", response_model=None, include_in_schema=False)
async def check_blob(digest: str) -> Response:
    raise managed_by_fleet("uploading a model file")
