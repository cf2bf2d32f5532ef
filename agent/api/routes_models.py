"""Routers for GET /v1/models (every model this device holds, loaded now or on demand, and
every LoRA adapter over one, ``<model>:<adapter>`` with ``parent`` naming its model, as vLLM
lists adapters) and GET /v1/models/{model} (one of them; an unknown id is a 404 in OpenAI's
error shape)."""

from __future__ import annotations

from fastapi import APIRouter, Depends

from edgefleet.agent.api.deps import model_table
from edgefleet.agent.api.errors import INVALID_REQUEST, APIError
from edgefleet.agent.api.openapi import MODEL_ERRORS
from edgefleet.agent.api.protocol import ModelCard, ModelList
from edgefleet.agent.api.served_adapters import ServedAdapter, adapters_of, find_adapter
from edgefleet.agent.runtimes.base import Runtime
from edgefleet.agent.runtimes.model_table import ModelTable

router = APIRouter()


def _card(runtime: Runtime) -> ModelCard:
    description = runtime.describe()
    return ModelCard(id=description.model_id, max_model_len=description.n_ctx)


def _adapter_card(adapter: ServedAdapter) -> ModelCard:
    return ModelCard(id=adapter.name, max_model_len=adapter.runtime.describe().n_ctx, parent=adapter.parent)


@router.get("/v1/models")
async def list_models(models: ModelTable = Depends(model_table)) -> ModelList:
    cards = []
    for runtime in models.runtimes():
        cards.append(_card(runtime))
        cards.extend(_adapter_card(adapter) for adapter in adapters_of(runtime))
    return ModelList(data=cards)


@router.get("/v1/models/{model:path}", responses={404: MODEL_ERRORS[404]})
async def retrieve_model(model: str, models: ModelTable = Depends(model_table)) -> ModelCard:
    runtime = models.get(model)
    if runtime is not None:
        return _card(runtime)
    adapter = find_adapter(models, model)
    if adapter is not None:
        return _adapter_card(adapter)
    raise APIError(
        404,
        f"The model `{model}` does not exist on this device.",
        type=INVALID_REQUEST,
        code="model_not_found",
        param="model",
    )
