"""Every failure leaves the API as an OpenAI error body with the right status.

Clients written against OpenAI (the official SDKs included) decide on retries and
exception types from the status and `error.code`, so nothing here may leak FastAPI's
default 422 shape or a bare 500.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from http import HTTPStatus
from types import MappingProxyType
from typing import Final

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

from edgefleet.agent.api.disconnect import CLIENT_CLOSED_REQUEST, ClientDisconnected
from edgefleet.agent.api.limits import (
    BodyTimeout,
    BodyTooLarge,
    JSONTooDeep,
    PromptTooLarge,
    RequestLimitExceeded,
    TooManyItems,
)
from edgefleet.agent.api.protocol import ErrorInfo, ErrorResponse
from edgefleet.agent.runtimes.base import (
    CapabilityNotSupported,
    ChatNotSupported,
    ContextLengthExceeded,
    FieldNotSupported,
    InvalidPromptError,
    RuntimeFailure,
    RuntimeUnloaded,
)
from edgefleet.agent.runtimes.lora import UnknownLora
from edgefleet.agent.runtimes.memory_budget import ModelMemoryExhausted
from edgefleet.agent.runtimes.model_table import ModelNotServed, NoActiveModel

logger = logging.getLogger(__name__)

INVALID_REQUEST = "invalid_request_error"
NOT_FOUND = "not_found_error"
SERVER_ERROR = "server_error"
UNAVAILABLE = "service_unavailable_error"
RATE_LIMITED = "rate_limit_exceeded"

# Sent with refusals that leave the body unread: the connection cannot carry another request.
CLOSE: Final[Mapping[str, str]] = MappingProxyType({"Connection": "close"})


class APIError(Exception):
    """An error the API reports as-is; raised by serving code, rendered by the handler below."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = INVALID_REQUEST,
        code: str | None = None,
        param: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.info = ErrorInfo(
            message=_encodable(message),
            type=type,
            param=None if param is None else _encodable(param),
            code=code,
        )
        self.headers = dict(headers or {})

    def response(self) -> JSONResponse:
        return error_response(self.status, self.info, headers=self.headers)


def _encodable(text: str) -> str:
    """`text` with lone surrogates spelled out: a message quoting a caller's bad string must still
    encode as UTF-8, or the error about it would become a 500."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


@dataclass(frozen=True, slots=True)
class _Mapping:
    status: int
    type: str
    code: str
    param: str | None = None  # fixed param, else the exception's (limits), else the caller's
    close: bool = False  # the request body may be unread: close the connection after answering


# Most specific first: the first entry the exception is an instance of wins.
_FAILURES: Final[Mapping[type[Exception], _Mapping]] = MappingProxyType(
    {
        BodyTooLarge: _Mapping(413, INVALID_REQUEST, "request_too_large", close=True),
        BodyTimeout: _Mapping(408, INVALID_REQUEST, "request_timeout", close=True),
        JSONTooDeep: _Mapping(400, INVALID_REQUEST, "json_too_deep"),
        PromptTooLarge: _Mapping(400, INVALID_REQUEST, "prompt_too_large"),
        TooManyItems: _Mapping(400, INVALID_REQUEST, "too_many_items"),
        ContextLengthExceeded: _Mapping(400, INVALID_REQUEST, "context_length_exceeded"),
        CapabilityNotSupported: _Mapping(400, INVALID_REQUEST, "capability_not_supported", param="model"),
        ChatNotSupported: _Mapping(400, INVALID_REQUEST, "chat_not_supported"),
        FieldNotSupported: _Mapping(400, INVALID_REQUEST, "unsupported_parameter"),
        UnknownLora: _Mapping(404, INVALID_REQUEST, "model_not_found", param="model"),  # unloaded since
        InvalidPromptError: _Mapping(400, INVALID_REQUEST, "invalid_prompt"),
        RuntimeUnloaded: _Mapping(503, UNAVAILABLE, "model_unloaded"),
        NoActiveModel: _Mapping(503, UNAVAILABLE, "model_not_loaded"),
        ModelNotServed: _Mapping(404, INVALID_REQUEST, "model_not_found", param="model"),
        ModelMemoryExhausted: _Mapping(503, UNAVAILABLE, "model_memory_exhausted", param="model"),
        RuntimeFailure: _Mapping(500, SERVER_ERROR, "generation_failed"),
    }
)


def api_error_for(exc: Exception, *, param: str | None = None) -> APIError:
    """The API error a runtime/serving exception stands for; unknown ones are internal errors."""
    if isinstance(exc, RequestLimitExceeded | FieldNotSupported) and exc.param is not None:
        param = exc.param
    for kind, mapping in _FAILURES.items():
        if isinstance(exc, kind):
            return APIError(
                mapping.status,
                str(exc),
                type=mapping.type,
                code=mapping.code,
                param=mapping.param or param,
                headers=CLOSE if mapping.close else None,
            )
    return APIError(500, "internal server error", type=SERVER_ERROR, code="internal_error")


def error_response(status: int, info: ErrorInfo, *, headers: Mapping[str, str] | None = None) -> JSONResponse:
    return JSONResponse(
        ErrorResponse(error=info).model_dump(mode="json"), status_code=status, headers=headers
    )


def validation_error(exc: RequestValidationError) -> APIError:
    """Pydantic's most specific complaint, phrased for a client: which field, what is wrong.

    For a union (content: a string or a list of parts) pydantic reports each member's
    failure; the one that got deepest into the value says what is really wrong with it.
    """
    errors = exc.errors()
    if not errors:
        return APIError(400, "invalid request")
    first = max(errors, key=lambda error: len(error.get("loc", ())))  # the first of the deepest
    loc = [str(part) for part in first.get("loc", ()) if part != "body" and not _is_union_tag(part)]
    kind = first.get("type", "")
    if kind == "json_invalid":
        detail = first.get("ctx", {}).get("error", "")
        return APIError(400, f"request body is not valid JSON: {detail}".rstrip(": "), code="invalid_json")
    if not loc and kind in ("model_attributes_type", "dict_type", "missing"):
        return APIError(400, "request body must be a JSON object sent with Content-Type: application/json")
    param = ".".join(loc) or None
    message = str(first.get("msg", "invalid value"))
    message = message.removeprefix("Value error, ")
    if param:
        message = f"{param}: {message}"
    return APIError(400, message, param=param, code="invalid_value" if kind != "missing" else "missing")


_UNION_TAGS = frozenset({"str", "int", "float", "bool", "list[str]", "none"})


def _is_union_tag(part: object) -> bool:
    """Pydantic names the union member that failed ('str', 'list[str]', ...); clients know fields."""
    return isinstance(part, str) and (part in _UNION_TAGS or "[" in part)


def install_error_handlers(
    app: FastAPI,
    *,
    on_rejected: Callable[[Request, APIError], None] | None = None,
    max_body_bytes: int | None = None,
) -> None:
    """Route every error path (ours, FastAPI's, Starlette's, unexpected) to an OpenAI body.

    `on_rejected` sees requests refused before any serving code ran (malformed or oversized
    bodies), so telemetry counts them too. `max_body_bytes` is the limit FastAPI enforces
    (`FastAPI(max_body_size=...)`); its 413 is reported as BodyTooLarge, naming the limit.
    """

    def rejected(request: Request, error: APIError) -> JSONResponse:
        if on_rejected is not None:
            on_rejected(request, error)
        return error.response()

    async def on_api_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, APIError)
        return exc.response()

    async def on_validation_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        return rejected(request, validation_error(exc))

    async def on_limit(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestLimitExceeded)
        return rejected(request, api_error_for(exc))

    async def on_http_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        status = exc.status_code
        if status == HTTPStatus.REQUEST_ENTITY_TOO_LARGE and max_body_bytes is not None:
            return rejected(request, api_error_for(BodyTooLarge.over(max_body_bytes)))
        kind = NOT_FOUND if status == 404 else INVALID_REQUEST if status < 500 else SERVER_ERROR
        message = exc.detail if isinstance(exc.detail, str) else HTTPStatus(status).phrase
        # Keep Starlette's headers: a 405 must say which methods are allowed (Allow).
        return error_response(status, ErrorInfo(message=message, type=kind, code=None), headers=exc.headers)

    async def on_client_gone(request: Request, exc: Exception) -> Response:
        return Response(status_code=CLIENT_CLOSED_REQUEST)  # nobody reads it; metrics count it

    async def on_unexpected(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error serving %s %s", request.method, request.url.path)
        return api_error_for(exc).response()

    app.add_exception_handler(APIError, on_api_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(RequestLimitExceeded, on_limit)
    app.add_exception_handler(StarletteHTTPException, on_http_error)
    app.add_exception_handler(ClientDisconnected, on_client_gone)
    app.add_exception_handler(Exception, on_unexpected)
