"""/openapi.json as the API really behaves, so generated clients and fuzzers can trust it.

FastAPI documents a 422 with its own error shape on every route with a body; this API
answers those cases with an OpenAI 400 instead, so the 422s (and their schemas) are
removed. Every model route documents the OpenAI error bodies it can return.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel

from edgefleet.agent.api.protocol import ChatCompletionChunk, CompletionResponse, ErrorResponse

_REF = "#/components/schemas/{model}"
# Models that only appear inside event streams, so FastAPI would not add them to components.
_STREAM_MODELS: tuple[type[BaseModel], ...] = (ChatCompletionChunk, CompletionResponse, ErrorResponse)

_RETRY_AFTER = {
    "Retry-After": {
        "description": "Seconds after which a retry is likely to be admitted.",
        "schema": {"type": "string", "pattern": "^[0-9]+$"},
    }
}

MODEL_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorResponse, "description": "Invalid request, or the model cannot do this"},
    404: {"model": ErrorResponse, "description": "The requested model is not served here"},
    408: {"model": ErrorResponse, "description": "The body did not arrive in time; the connection is closed"},
    413: {"model": ErrorResponse, "description": "The body is over the size limit; the connection is closed"},
    429: {"model": ErrorResponse, "description": "The request queue is full", "headers": _RETRY_AFTER},
    500: {"model": ErrorResponse, "description": "The model failed"},
    503: {"model": ErrorResponse, "description": "No model is loaded (or it was just replaced)"},
}

_FASTAPI_VALIDATION_SCHEMAS = ("HTTPValidationError", "ValidationError")


def json_or_stream(response: type[BaseModel], chunk: type[BaseModel], description: str) -> dict[str, Any]:
    """A 200 that is `response` as JSON, or with stream=true `chunk` objects as SSE then `[DONE]`
    (a failure after the first chunk arrives as an error event).

    Under OpenAPI 3.1 the schema of text/event-stream describes one event, and contentSchema
    says what its JSON `data` holds, so validators check each chunk, not just the framing.
    """
    json_data = {
        "type": "string",
        "contentMediaType": "application/json",
        "contentSchema": {
            "anyOf": [
                {"$ref": _REF.format(model=chunk.__name__)},
                {"$ref": _REF.format(model="ErrorResponse")},
            ]
        },
    }
    event = {
        "type": "object",
        "required": ["data"],
        "properties": {"data": {"anyOf": [{"const": "[DONE]"}, json_data]}},
    }
    return {
        "model": response,
        "description": description,
        "content": {"text/event-stream": {"schema": event}},
    }


def install_openapi(app: FastAPI) -> None:
    """Replace the app's schema builder with one that drops FastAPI's unused 422 responses."""

    def build() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(
                title=app.title,
                version=app.version,
                summary=app.summary,
                description=app.description,
                routes=app.routes,
            )
            for path_item in schema.get("paths", {}).values():
                for operation in path_item.values():
                    operation.get("responses", {}).pop("422", None)
            schemas = schema.setdefault("components", {}).setdefault("schemas", {})
            for name in _FASTAPI_VALIDATION_SCHEMAS:
                schemas.pop(name, None)
            for model in _STREAM_MODELS:
                definition = model.model_json_schema(mode="serialization", ref_template=_REF)
                for name, nested in definition.pop("$defs", {}).items():
                    schemas.setdefault(name, nested)
                schemas.setdefault(model.__name__, definition)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = build  # type: ignore[method-assign]
