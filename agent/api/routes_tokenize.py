"""Routers for POST /tokenize and POST /detokenize: the served model's own tokenizer.

Spelled as vLLM's OpenAI-compatible server spells them (llama.cpp's server has the same
paths with other field names): ``{"model", "prompt", "add_special_tokens"}`` gives
``{"count", "max_model_len", "tokens"}``, and ``{"model", "tokens"}`` gives ``{"prompt"}``.
``model`` is required, as on every other route here (a device may hold several models).
The prompt is tokenized as /v1/completions would tokenize it (special-token text written in
it counts as that token; with ``add_special_tokens`` the BOS the model adds itself), so
``count`` is what a completion's ``usage.prompt_tokens`` would report. vLLM's chat variant
(``messages`` instead of ``prompt``) is not offered; a body with ``messages`` and no
``prompt`` is a 400 (``prompt`` missing).

Neither route queues behind generation: tokenizing is one short call on the model's own
thread, between two tokens of whatever is generating. The model is leased meanwhile, so it
is not unloaded under the call.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any, TypeVar

from fastapi import APIRouter, Depends
from pydantic import BeforeValidator, Field
from starlette.concurrency import run_in_threadpool

from edgefleet.agent.api.bounded_body import BoundedBodyRoute
from edgefleet.agent.api.deps import model_table, request_limits
from edgefleet.agent.api.errors import INVALID_REQUEST, APIError, api_error_for
from edgefleet.agent.api.limits import RequestLimits
from edgefleet.agent.api.openapi import MODEL_ERRORS
from edgefleet.agent.api.protocol import MAX_NAME_CHARS, OpenAIBaseModel, OpenAIRequestModel
from edgefleet.agent.runtimes.base import Runtime, TokenizingRuntime
from edgefleet.agent.runtimes.model_table import ModelNotServed, ModelTable, NoActiveModel

MAX_DETOKENIZE_TOKENS = 131_072
MAX_TOKEN_ID = 2**31 - 1

router = APIRouter(route_class=BoundedBodyRoute)
T = TypeVar("T")


def _integral(value: Any) -> Any:
    """JSON's 7.0 is the integer 7 (as in edgefleet.agent.api.protocol)."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


TokenId = Annotated[int, Field(ge=0, le=MAX_TOKEN_ID), BeforeValidator(_integral)]


class TokenizeRequest(OpenAIRequestModel):
    model: str = Field(max_length=MAX_NAME_CHARS)
    prompt: str
    add_special_tokens: bool = True


class TokenizeResponse(OpenAIBaseModel):
    count: int
    max_model_len: int
    tokens: list[int]


class DetokenizeRequest(OpenAIRequestModel):
    model: str = Field(max_length=MAX_NAME_CHARS)
    tokens: list[TokenId] = Field(max_length=MAX_DETOKENIZE_TOKENS)


class DetokenizeResponse(OpenAIBaseModel):
    prompt: str


async def _with_tokenizer(
    models: ModelTable, name: str, param: str, call: Callable[[TokenizingRuntime], T]
) -> tuple[Runtime, T]:
    try:
        lease, _ = models.lease_model(name)  # an adapter, <model>:<adapter>, has its model's tokenizer
    except (NoActiveModel, ModelNotServed) as exc:
        raise api_error_for(exc) from exc
    try:
        runtime = lease.runtime
        if not isinstance(runtime, TokenizingRuntime):
            raise APIError(
                400,
                f"The model `{name}` does not expose its tokenizer.",
                type=INVALID_REQUEST,
                code="capability_not_supported",
                param="model",
            )
        try:
            return runtime, await run_in_threadpool(call, runtime)
        except Exception as exc:
            raise api_error_for(exc, param=param) from exc
    finally:
        lease.release()


@router.post("/tokenize", response_model=TokenizeResponse, responses=MODEL_ERRORS)
async def tokenize(
    request: TokenizeRequest,
    models: ModelTable = Depends(model_table),
    limits: RequestLimits = Depends(request_limits),
) -> TokenizeResponse:
    try:
        limits.check_chars("prompt", [request.prompt])
    except Exception as exc:
        raise api_error_for(exc) from exc
    runtime, tokens = await _with_tokenizer(
        models,
        request.model,
        "prompt",
        lambda tokenizer: tokenizer.tokenize(request.prompt, add_special=request.add_special_tokens),
    )
    return TokenizeResponse(count=len(tokens), max_model_len=runtime.describe().n_ctx, tokens=tokens)


@router.post("/detokenize", response_model=DetokenizeResponse, responses=MODEL_ERRORS)
async def detokenize(
    request: DetokenizeRequest, models: ModelTable = Depends(model_table)
) -> DetokenizeResponse:
    _, text = await _with_tokenizer(
        models, request.model, "tokens", lambda tokenizer: tokenizer.detokenize(request.tokens)
    )
    return DetokenizeResponse(prompt=text)
