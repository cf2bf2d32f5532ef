"""The device's OpenAI-compatible HTTP API, built by one factory.

Everything the routes need is put on `app.state` here (vLLM's pattern), so the app has
no globals and the agent can rebuild or test it freely: the admission queue, the metrics
registry and the serving classes all belong to one app.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from fastapi import FastAPI, Request
from starlette.types import ASGIApp

from edgefleet.agent.api import (
    ollama,
    routes_chat,
    routes_completions,
    routes_embeddings,
    routes_health,
    routes_metrics,
    routes_models,
    routes_responses,
    routes_tokenize,
)
from edgefleet.agent.api.admission import AdmissionQueue, QueueLimits
from edgefleet.agent.api.errors import APIError, install_error_handlers
from edgefleet.agent.api.framing import FramingGuard
from edgefleet.agent.api.limits import RequestLimits
from edgefleet.agent.api.metrics import ApiMetrics, ReleaseInfo, ResponseCounter
from edgefleet.agent.api.openapi import install_openapi
from edgefleet.agent.api.serving_base import ServingEndpoint
from edgefleet.agent.api.serving_chat import ServingChat
from edgefleet.agent.api.serving_completion import ServingCompletion
from edgefleet.agent.api.serving_embedding import ServingEmbedding
from edgefleet.agent.api.serving_responses import ServingResponses
from edgefleet.agent.runtimes.model_table import ModelTable
from edgefleet.agent.stats import InferenceStats

ROUTERS = (
    routes_models.router,
    routes_tokenize.router,
    routes_chat.router,
    routes_completions.router,
    routes_embeddings.router,
    routes_health.router,
    routes_metrics.router,
    routes_responses.router,
)


class DeviceAPI(FastAPI):
    """FastAPI with the FramingGuard outside its whole middleware stack.

    Middleware added later (the API key check, by `require_api_key`) still lands inside it,
    so no response, a 401 included, can leave a smuggled request on an open connection.
    """

    def __init__(self, *, request_limits: RequestLimits, **kwargs: Any) -> None:
        super().__init__(max_body_size=request_limits.max_body_bytes, **kwargs)
        self.request_limits = request_limits

    def build_middleware_stack(self) -> ASGIApp:
        return FramingGuard(
            super().build_middleware_stack(), max_body_bytes=self.request_limits.max_body_bytes
        )


def create_app(
    *,
    models: ModelTable,
    observer: Callable[[InferenceStats], None],
    health: Callable[[], dict[str, object]] | None = None,
    limits: QueueLimits | None = None,
    request_limits: RequestLimits | None = None,
    release_info: ReleaseInfo | None = None,
) -> FastAPI:
    """Build the API around `models` (the agent adds, replaces and removes models in it).

    `observer` receives one InferenceStats per model request, successful or not; it runs
    on the event loop, so it must be quick (queue the record, don't publish it).
    `health` adds agent figures to GET /healthz. `limits` bounds the requests running and
    waiting (default: one running, 16 waiting); `request_limits` what one request may send
    (body bytes, seconds and nesting, prompt characters, item counts). `release_info`
    returns a model's installed bundle, version and variant for the
    edgefleet_active_model_info metric.
    """
    request_limits = request_limits or RequestLimits()
    app = DeviceAPI(
        request_limits=request_limits,
        title="edgefleet device API",
        summary="OpenAI- and Ollama-compatible local inference",
        version="1.0.0",
    )
    queue = AdmissionQueue(limits)
    metrics = ApiMetrics(
        models=models,
        queue=queue,
        endpoint_paths={
            ServingChat.endpoint: "/v1/chat/completions",
            ServingCompletion.endpoint: "/v1/completions",
            ServingEmbedding.endpoint: "/v1/embeddings",
            **ollama.ENDPOINT_PATHS,
            ServingResponses.endpoint: "/v1/responses",
        },
        release_info=release_info,
    )

    def observe(stats: InferenceStats) -> None:
        metrics.observe(stats)
        observer(stats)

    chat = ServingChat(models=models, queue=queue, observer=observe, limits=request_limits)
    completion = ServingCompletion(models=models, queue=queue, observer=observe, limits=request_limits)
    embedding = ServingEmbedding(models=models, queue=queue, observer=observe, limits=request_limits)
    responses = ServingResponses(models=models, queue=queue, observer=observe, limits=request_limits)
    app.state.models = models
    app.state.request_limits = request_limits
    app.state.health_probe = health
    app.state.admission_queue = queue
    app.state.metrics = metrics
    app.state.serving_chat = chat
    app.state.serving_completion = completion
    app.state.serving_embedding = embedding
    app.state.serving_responses = responses

    # Malformed bodies never reach the serving classes; they are still counted per endpoint.
    endpoints: Mapping[str, ServingEndpoint] = {
        "/v1/chat/completions": chat,
        "/v1/completions": completion,
        "/v1/embeddings": embedding,
        "/v1/responses": responses,
    }

    def on_rejected(request: Request, error: APIError) -> None:
        serving = endpoints.get(request.url.path)
        if serving is not None:
            serving.rejected(error)

    install_error_handlers(app, on_rejected=on_rejected, max_body_bytes=request_limits.max_body_bytes)
    for router in ROUTERS:
        app.include_router(router)
    ollama.install(app, models=models, queue=queue, observer=observe, limits=request_limits)
    for route in app.routes:
        path: Any = getattr(route, "path", None)
        if isinstance(path, str):
            metrics.add_route(path)
    app.add_middleware(ResponseCounter, metrics=metrics)
    install_openapi(app)
    return app
