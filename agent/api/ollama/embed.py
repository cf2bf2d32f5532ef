"""POST /api/embed and the older /api/embeddings, through `Runtime.embed` like /v1/embeddings.

Embedding takes a queue slot like any other request (it uses the same cores), and the batch
runs to its end in a worker thread that releases the slot, so the queue never admits work
onto a busy model. Options are checked as for generation (a num_ctx over the window, an
unknown or fleet-set option is refused); the sampling ones have nothing to act on here.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request

from edgefleet.agent.api.errors import SERVER_ERROR, APIError, api_error_for
from edgefleet.agent.api.limits import RequestLimits
from edgefleet.agent.api.ollama.errors import option_error
from edgefleet.agent.api.ollama.options import OllamaOptions, OptionRefused
from edgefleet.agent.api.ollama.serving import nanos, resolve
from edgefleet.agent.api.serving_base import Admission, ServingEndpoint, error_code
from edgefleet.agent.runtimes.base import Capability, Embeddings


class Embedded:
    """The vectors of one request, with the figures Ollama reports for embeddings."""

    __slots__ = ("load_duration", "model", "prompt_tokens", "total_duration", "vectors")

    def __init__(
        self, *, model: str, vectors: list[list[float]], prompt_tokens: int, load_s: float, total_s: float
    ) -> None:
        self.model = model
        self.vectors = vectors
        self.prompt_tokens = prompt_tokens
        self.load_duration = nanos(load_s)
        self.total_duration = nanos(total_s)


class OllamaEmbedding(ServingEndpoint):
    endpoint = "ollama.embed"
    capability = Capability.EMBEDDINGS
    capability_name = "embeddings"
    applies_lora = False  # an adapter changes generation; a vector is always the model's own

    async def embed(
        self, *, model: str, texts: Sequence[str], options: OllamaOptions, raw: Request, param: str
    ) -> Embedded:
        timer = self.timer(model=model, stream=False)
        self.enforce(timer, lambda limits: check_size(limits, texts, param))
        admission = await self.admit(resolve(self._models, model), raw, timer)
        admitted_at = time.perf_counter()
        try:
            options.check_window(admission.runtime.describe().n_ctx)
        except OptionRefused as exc:
            admission.release()
            error = option_error(exc)
            timer.report(error=error_code(error))
            raise error from exc
        try:
            embeddings = await run_in_threadpool(_embed_then_release, admission, texts)
        except Exception as exc:
            error = api_error_for(exc, param=param)
            timer.report(error=error_code(error))
            raise error from exc
        if len(embeddings.vectors) != len(texts):
            timer.report(prompt_tokens=embeddings.prompt_tokens, error="internal_error")
            raise APIError(500, "the model returned a wrong number of embeddings", type=SERVER_ERROR)
        timer.report(prompt_tokens=embeddings.prompt_tokens)
        assert timer.finished_at is not None
        return Embedded(
            model=timer.model,
            vectors=[[float(value) for value in vector] for vector in embeddings.vectors],
            prompt_tokens=embeddings.prompt_tokens,
            load_s=admitted_at - timer.started_at,
            total_s=timer.finished_at - timer.started_at,
        )


def check_size(limits: RequestLimits, texts: Sequence[str], param: str) -> None:
    limits.check_count(param, len(texts), limit=limits.max_embedding_inputs, setting="max_embedding_inputs")
    limits.check_chars(param, texts)


def _embed_then_release(admission: Admission, texts: Sequence[str]) -> Embeddings:
    try:
        return admission.runtime.embed(texts)
    finally:
        admission.release()
