"""Device credentials: issued once at enrollment, presented as bearer metadata, stored hashed."""

from __future__ import annotations

import hashlib
import secrets
from typing import Any

import grpc

from controlplane.db import crud
from controlplane.db.database import Database
from controlplane.db.models import Device

AUTH_HEADER = "authorization"
BEARER = "Bearer "

Context = grpc.aio.ServicerContext[Any, Any]
"""Servicer context of any call; the servicers are typed by their generated stubs."""


def secret_sha256(secret: str) -> str:
    """Only hashes of tokens and credentials are stored; a leaked database grants nothing."""
    return hashlib.sha256(secret.encode()).hexdigest()


def new_secret() -> str:
    return secrets.token_urlsafe(32)


def new_device_id() -> str:
    return f"dev-{secrets.token_hex(6)}"


def bearer_from_metadata(context: Context) -> str | None:
    for key, value in context.invocation_metadata() or ():
        if key == AUTH_HEADER and isinstance(value, str) and value.startswith(BEARER):
            return value[len(BEARER) :]
    return None


async def authenticate_device(db: Database, context: Context) -> Device:
    """Returns the calling device, or aborts the call with UNAUTHENTICATED."""
    credential = bearer_from_metadata(context)
    if not credential:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, "device credential missing")
    digest = secret_sha256(credential)
    device = await db.run(lambda s: crud.device_by_credential(s, credential_sha256=digest))
    if device is None:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, "unknown device credential")
    if device.revoked_at is not None:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, f"device {device.id} was revoked")
    return device
