"""Ollama's native API (`/api/*`) on the device, beside the OpenAI one (`/v1/*`), on the same port.

Ollama clients (the `ollama` Python and JavaScript libraries, Open WebUI, editor plugins) work
against a device unchanged: they list, show and use the models the fleet installed, with the
same API key, admission queue and request limits as /v1/*. Model management (pull, push,
create, copy, delete) is the fleet's, so those calls are refused. Modules: `protocol` (wire
shapes), `options` (Ollama's options onto the runtime's), `serving` and `embed` (the model
endpoints), `models` (tags, ps, show, version), `errors` (Ollama's error body), `auth`,
`ndjson`, `state` (what lives on app.state) and `routes`.
"""

from __future__ import annotations

from collections.abc import Callable

from fastapi import FastAPI

from edgefleet.agent.api.admission import AdmissionQueue
from edgefleet.agent.api.limits import RequestLimits
from edgefleet.agent.api.ollama.routes import router
from edgefleet.agent.api.ollama.state import ENDPOINT_PATHS, OllamaState
from edgefleet.agent.runtimes.model_table import ModelTable
from edgefleet.agent.stats import InferenceStats

__all__ = ["ENDPOINT_PATHS", "install"]


def install(
    app: FastAPI,
    *,
    models: ModelTable,
    queue: AdmissionQueue,
    observer: Callable[[InferenceStats], None],
    limits: RequestLimits,
) -> None:
    """Serve Ollama's API on `app`, sharing its model table, queue, observer and limits."""
    app.state.ollama = OllamaState(models=models, queue=queue, observer=observer, limits=limits)
    app.include_router(router)
