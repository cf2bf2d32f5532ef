"""Router for GET /v1/models: the one model this device serves, or none."""

from __future__ import annotations

from fastapi import APIRouter, Depends

from agent.api.deps import active_model
from agent.api.protocol import ModelCard, ModelList
from agent.serving import ActiveModel

router = APIRouter()


@router.get("/v1/models")
async def list_models(active: ActiveModel = Depends(active_model)) -> ModelList:
    runtime = active.current()
    if runtime is None:
        return ModelList(data=[])
    description = runtime.describe()
    return ModelList(data=[ModelCard(id=description.model_id, max_model_len=description.n_ctx)])
