"""Router for GET /healthz: 200 while the device holds a model it can serve, 503 otherwise
(for load balancers and systemd/Kubernetes probes), with the agent's own health figures."""

from __future__ import annotations

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse

from edgefleet.agent.api.deps import HealthProbe, health_probe, model_table
from edgefleet.agent.api.protocol import HealthResponse
from edgefleet.agent.runtimes.model_table import ModelTable

router = APIRouter()


@router.get(
    "/healthz",
    response_model=None,
    responses={
        200: {"model": HealthResponse, "description": "A model is loaded"},
        503: {"model": HealthResponse, "description": "No model is loaded"},
    },
)
async def healthz(
    models: ModelTable = Depends(model_table), probe: HealthProbe | None = Depends(health_probe)
) -> JSONResponse:
    # The probe's keys come first so "status" and "models" always describe what is served.
    body: dict[str, object] = dict(probe()) if probe is not None else {}
    descriptions = [runtime.describe() for runtime in models.runtimes()]
    if not descriptions:
        body.update(status="unavailable", model=None, models=[])
        return JSONResponse(body, status_code=503)
    # "model"/"runtime": the first model by name, for probes written for one-model devices.
    first = descriptions[0]
    body.update(
        status="ok",
        model=first.model_id,
        runtime=first.runtime,
        models=[{"id": d.model_id, "runtime": d.runtime} for d in descriptions],
    )
    return JSONResponse(body)
