"""API keys for the device API when it listens beyond loopback.

On 127.0.0.1 the API is open, as Ollama's and Foundry Local's are: only this machine can reach
it. Bound anywhere else it requires ``Authorization: Bearer <key>`` (the OpenAI convention,
so every OpenAI client sends it already) on /v1/*, on /tokenize and /detokenize (they run on
the model's thread) and on /metrics (usage figures and the model's name are nobody else's
business; Prometheus sends a bearer token natively).
/healthz stays open for load balancers.
"""

from __future__ import annotations

import hmac
import ipaddress
import secrets
from pathlib import Path

from fastapi import FastAPI
from starlette.types import ASGIApp, Receive, Scope, Send

from edgefleet.agent.api.errors import APIError
from edgefleet.protos.fleet.fsio import atomic_write_bytes

PROTECTED_PREFIX = "/v1/"
PROTECTED_PATHS = frozenset({"/metrics", "/tokenize", "/detokenize"})


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def load_or_create_api_key(path: Path) -> str:
    """The device's API key, created (owner-readable) on first use."""
    try:
        key = path.read_text().strip()
    except FileNotFoundError:
        key = ""
    if not key:
        key = f"ef-{secrets.token_urlsafe(32)}"
        atomic_write_bytes(path, (key + "\n").encode(), mode=0o600)
    return key


class ApiKeyMiddleware:
    """Plain ASGI (not BaseHTTPMiddleware) so streaming responses and disconnects pass untouched."""

    def __init__(self, app: ASGIApp, *, api_key: str) -> None:
        self.app = app
        self._expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and _protected(scope["path"]):
            presented = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(presented, self._expected):
                response = APIError(
                    401,
                    "missing or wrong API key: send 'Authorization: Bearer <key>'",
                    code="invalid_api_key",
                ).response()
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _protected(path: str) -> bool:
    return path.startswith(PROTECTED_PREFIX) or path in PROTECTED_PATHS


def require_api_key(app: FastAPI, api_key: str) -> None:
    app.add_middleware(ApiKeyMiddleware, api_key=api_key)
