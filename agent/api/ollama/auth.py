"""The device's API key on /api/*, exactly as on /v1/*.

`edgefleet.agent.api.auth.require_api_key` guards the paths it knows when the API listens
beyond loopback; the key it was given is read back from the app's middleware list here, so
/api/* asks for the same `Authorization: Bearer <key>` (the `ollama` client sends it from
`headers=` or OLLAMA_API_KEY) and stays open, like /v1/*, when no key is required.
"""

from __future__ import annotations

import hmac

from fastapi import FastAPI, Request

from edgefleet.agent.api.auth import ApiKeyMiddleware
from edgefleet.agent.api.errors import APIError


def required_key(app: FastAPI) -> str | None:
    """The key `require_api_key` installed on `app`, or None when the API is open."""
    for middleware in app.user_middleware:
        factory: object = middleware.cls
        if factory is ApiKeyMiddleware:
            key = middleware.kwargs.get("api_key")
            return key if isinstance(key, str) else None
    return None


async def check_api_key(request: Request) -> None:
    """A router dependency: refuse a missing or wrong key with 401 before the body is parsed."""
    key = required_key(request.app)
    if key is None:
        return
    presented = request.headers.get("authorization", "").encode()
    if not hmac.compare_digest(presented, f"Bearer {key}".encode()):
        raise APIError(
            401, "missing or wrong API key: send 'Authorization: Bearer <key>'", code="invalid_api_key"
        )
