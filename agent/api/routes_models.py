"""Router for GET /v1/models: every model this device holds (loaded now or on demand)."""

from __future__ import annotations

from fastapi import APIRouter, Depends

from edgefleet.agent.api.deps import model_table
from edgefleet.agent.api.protocol import ModelCard, ModelList
from edgefleet.agent.runtimes.model_table import ModelTable

router = APIRouter()


@router.get("/v1/models")
async def list_models(models: ModelTable = Depends(model_table)) -> ModelList:
    cards = []
    for runtime in models.runtimes():
        description = runtime.describe()
        cards.append(ModelCard(id=description.model_id, max_model_len=description.n_ctx))
    return ModelList(data=cards)
