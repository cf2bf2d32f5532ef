"""POST /v1/embeddings: texts in, one vector per text out, through `Runtime.embed`.

Embedding shares the model and the admission queue with generation (it uses the same
cores), so it takes a slot like any other request. The batch runs to its end in a worker
thread once started: a runtime cannot stop half-way through a batch, and the slot is
released by that thread, so the queue never admits work onto a busy model.
"""

from __future__ import annotations

import base64
import struct
from collections.abc import Sequence

from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response

from edgefleet.agent.api.errors import APIError, api_error_for
from edgefleet.agent.api.limits import RequestLimits
from edgefleet.agent.api.protocol import EmbeddingData, EmbeddingRequest, EmbeddingResponse, EmbeddingUsage
from edgefleet.agent.api.serving_base import Admission, ServingEndpoint, error_code
from edgefleet.agent.runtimes.base import Capability, Embeddings


class ServingEmbedding(ServingEndpoint):
    endpoint = "embeddings"
    capability = Capability.EMBEDDINGS
    capability_name = "embeddings"
    applies_lora = False  # an adapter changes generation; a vector is always the model's own

    async def handle(self, request: EmbeddingRequest, raw: Request) -> Response:
        timer = self.timer(model=request.model, stream=False)
        texts = request.texts()
        self.enforce(timer, lambda limits: check_size(limits, texts))
        admission = await self.admit(request.model, raw, timer)
        try:
            embeddings = await run_in_threadpool(_embed_then_release, admission, texts)
        except Exception as exc:
            error = api_error_for(exc, param="input")
            timer.report(error=error_code(error))
            raise error from exc
        vectors = embeddings.vectors
        if len(vectors) != len(texts):
            error = APIError(500, "the model returned a wrong number of embeddings", type="server_error")
            timer.report(prompt_tokens=embeddings.prompt_tokens, error="internal_error")
            raise error
        size = len(vectors[0]) if vectors else 0
        if request.dimensions is not None and request.dimensions != size:
            error = APIError(
                400,
                f"The model `{timer.model}` produces {size}-dimensional embeddings and cannot "
                f"shorten them; omit `dimensions` or send {size}.",
                code="invalid_value",
                param="dimensions",
            )
            timer.report(prompt_tokens=embeddings.prompt_tokens, error=error_code(error))
            raise error
        timer.report(prompt_tokens=embeddings.prompt_tokens)
        body = EmbeddingResponse(
            data=[
                EmbeddingData(index=index, embedding=encode(vector, request.encoding_format))
                for index, vector in enumerate(vectors)
            ],
            model=timer.model,
            usage=EmbeddingUsage(
                prompt_tokens=embeddings.prompt_tokens, total_tokens=embeddings.prompt_tokens
            ),
        )
        return JSONResponse(body.model_dump(mode="json"))


def check_size(limits: RequestLimits, texts: Sequence[str]) -> None:
    limits.check_count("input", len(texts), limit=limits.max_embedding_inputs, setting="max_embedding_inputs")
    limits.check_chars("input", texts)


def _embed_then_release(admission: Admission, texts: Sequence[str]) -> Embeddings:
    try:
        return admission.runtime.embed(texts)
    finally:
        admission.release()


def encode(vector: Sequence[float], encoding_format: str) -> list[float] | str:
    """As OpenAI sends it: a JSON array, or base64 of little-endian float32 (what the SDKs decode)."""
    if encoding_format == "base64":
        return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode("ascii")
    return [float(value) for value in vector]
