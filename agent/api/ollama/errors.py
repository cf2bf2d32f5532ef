"""Every failure on /api/* leaves as Ollama's error body: `{"error": "..."}` with the right status.

The app's error handlers (edgefleet.agent.api.errors) speak OpenAI's shape, and they are the
app's, not a router's. So /api/* routes use `OllamaRoute`, whose handler catches what the
route raises (malformed bodies, limits, refusals, model errors) and answers it here, with the
status and headers the OpenAI side would use and the message Ollama clients print. Requests
refused before the serving code saw them are still counted for their endpoint.

Ollama reads a body as JSON whatever its Content-Type says (its docs' `curl -d` examples send
form encoding), so these routes do too.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Coroutine
from http import HTTPStatus
from typing import Any, Protocol

from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request
from starlette.responses import Response

from edgefleet.agent.api.bounded_body import BoundedBodyRoute
from edgefleet.agent.api.deps import request_limits
from edgefleet.agent.api.disconnect import ClientDisconnected
from edgefleet.agent.api.errors import (
    INVALID_REQUEST,
    SERVER_ERROR,
    APIError,
    api_error_for,
    validation_error,
)
from edgefleet.agent.api.limits import BodyTooLarge, RequestLimitExceeded
from edgefleet.agent.api.ollama.options import OptionRefused, WindowTooSmall
from edgefleet.agent.api.ollama.protocol import OllamaError

logger = logging.getLogger(__name__)

_JSON = b"application/json"


class Rejections(Protocol):
    """Counts requests refused before their serving code ran, per path (on app.state.ollama)."""

    def rejected_at(self, path: str, error: APIError) -> None: ...


def ollama_response(error: APIError) -> JSONResponse:
    body = OllamaError(error=error.info.message, code=error.info.code).body()
    return JSONResponse(body, status_code=error.status, headers=error.headers)


def option_error(exc: OptionRefused) -> APIError:
    """A refused option: 400, naming it (context_length_exceeded for a num_ctx over the window)."""
    code = "context_length_exceeded" if isinstance(exc, WindowTooSmall) else "option_not_supported"
    return APIError(400, str(exc), code=code, param=f"options.{exc.option}")


def as_api_error(exc: Exception, request: Request) -> APIError:
    """The error `exc` stands for, as the OpenAI side would rate it."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, RequestValidationError):
        return validation_error(exc)
    if isinstance(exc, OptionRefused):
        return option_error(exc)
    if isinstance(exc, StarletteHTTPException):
        if exc.status_code == HTTPStatus.REQUEST_ENTITY_TOO_LARGE:
            return api_error_for(BodyTooLarge.over(request_limits(request).max_body_bytes))
        message = exc.detail if isinstance(exc.detail, str) else HTTPStatus(exc.status_code).phrase
        kind = INVALID_REQUEST if exc.status_code < 500 else SERVER_ERROR
        return APIError(exc.status_code, message, type=kind, headers=exc.headers)
    if isinstance(exc, RequestLimitExceeded):
        return api_error_for(exc)
    logger.exception("unhandled error serving %s %s", request.method, request.url.path)
    return api_error_for(exc)


def _read_body_as_json(request: Request) -> None:
    """Declare the body JSON, as Ollama treats it, so FastAPI parses it whatever was sent."""
    headers = request.scope["headers"]
    declared = [value for name, value in headers if name.lower() == b"content-type"]
    if not declared or all(value.split(b";")[0].strip().lower() == _JSON for value in declared):
        return
    request.scope["headers"] = [(n, v) for n, v in headers if n.lower() != b"content-type"] + [
        (b"content-type", _JSON)
    ]
    request.__dict__.pop("_headers", None)  # a cached view of the old headers


class OllamaRoute(BoundedBodyRoute):
    """The route class of /api/*: bounded bodies (as on /v1/*) and Ollama-shaped errors."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        run = super().get_route_handler()

        async def handler(request: Request) -> Response:
            _read_body_as_json(request)
            try:
                return await run(request)
            except ClientDisconnected:
                raise
            except Exception as exc:
                error = as_api_error(exc, request)
                # An APIError comes from code that reported it already (serving code, the key check).
                rejections: Rejections | None = getattr(request.app.state, "ollama", None)
                if not isinstance(exc, APIError) and rejections is not None:
                    rejections.rejected_at(request.url.path, error)
                return ollama_response(error)

        return handler
