"""The Ollama API's serving objects, built once per app and kept on `app.state.ollama`.

They share the app's model table, admission queue, request limits and observer with the
/v1/* endpoints, so an Ollama request waits in the same line, under the same limits, and is
counted in the same telemetry (endpoints "ollama.chat", "ollama.generate", "ollama.embed").
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Final

from fastapi import Request

from edgefleet.agent.api.admission import AdmissionQueue
from edgefleet.agent.api.errors import APIError
from edgefleet.agent.api.limits import RequestLimits
from edgefleet.agent.api.ollama.embed import OllamaEmbedding
from edgefleet.agent.api.ollama.serving import OllamaChat, OllamaGenerate
from edgefleet.agent.api.serving_base import ServingEndpoint
from edgefleet.agent.runtimes.model_table import ModelTable
from edgefleet.agent.stats import InferenceStats

CHAT_PATH = "/api/chat"
GENERATE_PATH = "/api/generate"
EMBED_PATH = "/api/embed"
EMBEDDINGS_PATH = "/api/embeddings"

# InferenceStats.endpoint -> the path its metrics are labelled with
ENDPOINT_PATHS: Final[Mapping[str, str]] = MappingProxyType(
    {
        OllamaChat.endpoint: CHAT_PATH,
        OllamaGenerate.endpoint: GENERATE_PATH,
        OllamaEmbedding.endpoint: EMBED_PATH,
    }
)


class OllamaState:
    """The serving objects of /api/*, and which of them owns each model path."""

    def __init__(
        self,
        *,
        models: ModelTable,
        queue: AdmissionQueue,
        observer: Callable[[InferenceStats], None],
        limits: RequestLimits,
    ) -> None:
        self.models = models
        self.chat = OllamaChat(models=models, queue=queue, observer=observer, limits=limits)
        self.generate = OllamaGenerate(models=models, queue=queue, observer=observer, limits=limits)
        self.embedding = OllamaEmbedding(models=models, queue=queue, observer=observer, limits=limits)
        self._by_path: Mapping[str, ServingEndpoint] = {
            CHAT_PATH: self.chat,
            GENERATE_PATH: self.generate,
            EMBED_PATH: self.embedding,
            EMBEDDINGS_PATH: self.embedding,
        }

    def rejected_at(self, path: str, error: APIError) -> None:
        """Count a request to `path` refused before its serving code ran (a malformed body)."""
        serving = self._by_path.get(path)
        if serving is not None:
            serving.rejected(error)


def ollama_state(request: Request) -> OllamaState:
    state = getattr(request.app.state, "ollama", None)
    if not isinstance(state, OllamaState):
        raise TypeError("app.state.ollama is not an OllamaState; build the app with create_app()")
    return state
