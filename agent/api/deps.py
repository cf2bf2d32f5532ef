"""FastAPI dependencies: everything a route needs comes from `app.state`, set by create_app.

No module-level state, so several apps (tests, a bench) can live in one process.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from fastapi import Request

from edgefleet.agent.api.limits import RequestLimits
from edgefleet.agent.api.metrics import ApiMetrics
from edgefleet.agent.api.serving_chat import ServingChat
from edgefleet.agent.api.serving_completion import ServingCompletion
from edgefleet.agent.api.serving_embedding import ServingEmbedding
from edgefleet.agent.runtimes.model_table import ModelTable

T = TypeVar("T")

HealthProbe = Callable[[], dict[str, object]]


def _state(request: Request, name: str, kind: type[T]) -> T:
    value = getattr(request.app.state, name)
    if not isinstance(value, kind):
        raise TypeError(f"app.state.{name} is not a {kind.__name__}; build the app with create_app()")
    return value


def chat_serving(request: Request) -> ServingChat:
    return _state(request, "serving_chat", ServingChat)


def completion_serving(request: Request) -> ServingCompletion:
    return _state(request, "serving_completion", ServingCompletion)


def embedding_serving(request: Request) -> ServingEmbedding:
    return _state(request, "serving_embedding", ServingEmbedding)


def api_metrics(request: Request) -> ApiMetrics:
    return _state(request, "metrics", ApiMetrics)


def request_limits(request: Request) -> RequestLimits:
    return _state(request, "request_limits", RequestLimits)


def model_table(request: Request) -> ModelTable:
    return _state(request, "models", ModelTable)


def health_probe(request: Request) -> HealthProbe | None:
    probe: HealthProbe | None = getattr(request.app.state, "health_probe", None)
    return probe
