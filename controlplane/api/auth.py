"""Who is calling: devices by their client certificate, operators by their bearer token.

A device's identity is the certificate the mutual-TLS listener verified against the fleet
CA. The serial must be one the CA issued to that device and neither may be revoked, so a
revocation takes effect on the next call, not when the certificate expires.
"""

from __future__ import annotations

import hashlib
import secrets
from typing import Any

import grpc
from cryptography import x509
from cryptography.x509.oid import NameOID

from edgefleet.controlplane.api.refusals import CALLER, Caller, Refused
from edgefleet.controlplane.store import crud
from edgefleet.controlplane.store.database import Database
from edgefleet.controlplane.store.models import Device

AUTH_HEADER = "authorization"
BEARER = "Bearer "
PEER_CERTIFICATE = "x509_pem_cert"

Context = grpc.aio.ServicerContext[Any, Any]
"""Servicer context of any call; the servicers are typed by their generated stubs."""


def secret_sha256(secret: str) -> str:
    """Only hashes of tokens are stored; a leaked database grants nothing."""
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


def peer_certificate(context: Context) -> x509.Certificate | None:
    """The client certificate gRPC verified on this connection; None on a server-TLS-only port."""
    pem = context.auth_context().get(PEER_CERTIFICATE)
    if not pem:
        return None
    try:
        return x509.load_pem_x509_certificate(next(iter(pem)))
    except ValueError:
        return None  # gRPC verified it against the fleet CA; unreadable here means not ours


def common_name(cert: x509.Certificate) -> str:
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    value = names[0].value if names else ""
    return value if isinstance(value, str) else value.decode()


def unauthenticated(message: str, **kwargs: Any) -> Refused:
    return Refused(grpc.StatusCode.UNAUTHENTICATED, message, **kwargs)


async def authenticate_device(db: Database, context: Context) -> Device:
    """Returns the calling device (and marks the call as its own), or raises Refused with
    UNAUTHENTICATED. A caller without a client certificate is a stranger; one whose
    certificate the fleet CA issued but that is revoked is not (it spends no rate-limit token)."""
    cert = peer_certificate(context)
    if cert is None:
        raise unauthenticated(
            "device calls need the device's client certificate, on the device (mutual TLS) endpoint",
            action="device.authenticate",
        )
    held = await db.run(lambda s: crud.certificate_holder(s, serial=cert.serial_number))
    name = common_name(cert)[:64]
    if held is None or held[1].id != name:
        raise unauthenticated(
            "this certificate was not issued to a device", action="device.authenticate", target=name
        )
    record, device = held
    who = {"action": "device.authenticate", "target": device.id, "actor": f"device:{device.id}"}
    if device.revoked_at is not None:
        raise unauthenticated(f"device {device.id} was revoked", charges=False, **who)
    if record.revoked_at is not None:
        raise unauthenticated("this certificate was revoked", charges=False, **who)
    CALLER.set(Caller(actor=f"device:{device.id}", is_operator=False))
    return device
