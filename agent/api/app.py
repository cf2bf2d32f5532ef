"""The device's OpenAI-compatible HTTP API, built by one factory.

Everything the routes need is put on `app.state` here (vLLM's pattern), so the app has
no globals and the agent can rebuild or test it freely.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from fastapi import FastAPI, Request

from agent.api import routes_chat, routes_completions, routes_health, routes_models
from agent.api.errors import APIError, install_error_handlers
from agent.api.serving_base import OpenAIServing
from agent.api.serving_chat import ServingChat
from agent.api.serving_completion import ServingCompletion
from agent.serving import ActiveModel
from agent.stats import InferenceStats

ROUTERS = (routes_models.router, routes_chat.router, routes_completions.router, routes_health.router)


def create_app(
    *,
    active: ActiveModel,
    observer: Callable[[InferenceStats], None],
    health: Callable[[], dict[str, object]] | None = None,
) -> FastAPI:
    """Build the API around `active` (swapped by the agent as models change).

    `observer` receives one InferenceStats per generation request, successful or not;
    it runs on the event loop, so it must be quick (queue the record, don't publish it).
    `health` adds agent figures to GET /healthz.
    """
    app = FastAPI(title="edgefleet device API", summary="OpenAI-compatible local inference")
    chat = ServingChat(active=active, observer=observer)
    completion = ServingCompletion(active=active, observer=observer)
    app.state.active_model = active
    app.state.health_probe = health
    app.state.serving_chat = chat
    app.state.serving_completion = completion

    # Malformed bodies never reach the serving classes; they are still counted per endpoint.
    endpoints: Mapping[str, OpenAIServing[Any]] = {
        "/v1/chat/completions": chat,
        "/v1/completions": completion,
    }

    def on_rejected(request: Request, error: APIError) -> None:
        serving = endpoints.get(request.url.path)
        if serving is not None:
            runtime = active.current()
            serving.rejected(error, model="" if runtime is None else runtime.describe().model_id)

    install_error_handlers(app, on_rejected=on_rejected)
    for router in ROUTERS:
        app.include_router(router)
    return app
