"""Router for GET /healthz: 200 while a model is loaded, 503 otherwise (for load balancers
and systemd/Kubernetes probes), with the agent's own health figures merged in."""

from __future__ import annotations

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse

from agent.api.deps import HealthProbe, active_model, health_probe
from agent.api.protocol import HealthResponse
from agent.serving import ActiveModel

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
    active: ActiveModel = Depends(active_model), probe: HealthProbe | None = Depends(health_probe)
) -> JSONResponse:
    # The probe's keys come first so "status" and "model" always describe what is served.
    body: dict[str, object] = dict(probe()) if probe is not None else {}
    runtime = active.current()
    if runtime is None:
        body.update(status="unavailable", model=None)
        return JSONResponse(body, status_code=503)
    description = runtime.describe()
    body.update(status="ok", model=description.model_id, runtime=description.runtime)
    return JSONResponse(body)
