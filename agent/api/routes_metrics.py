"""Router for GET /metrics: Prometheus text format from the app's own registry.

Open like /healthz when the API listens on loopback (only this machine's scraper can reach
it); off loopback the API key applies, as on /v1/* (see `auth`): the figures name the model
and show how the device is used, and Prometheus sends a bearer token natively
(`authorization: {credentials_file: ...}` in the scrape config).
"""

from __future__ import annotations

from fastapi import APIRouter, Depends
from starlette.responses import Response

from edgefleet.agent.api.deps import api_metrics
from edgefleet.agent.api.metrics import CONTENT_TYPE, ApiMetrics

router = APIRouter()


@router.get(
    "/metrics",
    response_class=Response,
    responses={
        200: {
            "description": "Prometheus text exposition format",
            "content": {CONTENT_TYPE.split(";")[0]: {"schema": {"type": "string"}}},
        }
    },
)
async def metrics(registry: ApiMetrics = Depends(api_metrics)) -> Response:
    return Response(registry.render(), media_type=CONTENT_TYPE)
