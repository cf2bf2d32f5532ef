"""Who is calling: devices by their client certificate, operators by their bearer token.

A device's identity is the certificate the mutual-TLS listener verified against the fleet
CA. The serial must be one the CA issued to that device and neither may be revoked, so a
revocation takes effect on the next call, not when the certificate expires. An operator's is
the token it sends, whose role must grant what the call needs (``fleet.rbac`` holds the roles
and the token hashes; this module reads them from the call's metadata).
"""

from __future__ import annotations

import secrets
from typing import Any

import grpc
from cryptography import x509
from cryptography.x509.oid import NameOID
from sqlmodel import Session

from edgefleet.controlplane.api.refusals import CALLER, Caller, NotPermitted, Unauthenticated
from edgefleet.controlplane.fleet.rbac import MAX_TOKEN_CHARS, OperatorIdentity, Role, identify
from edgefleet.controlplane.store import devices
from edgefleet.controlplane.store.database import Database
from edgefleet.controlplane.store.models import Device

AUTH_HEADER = "authorization"
BEARER = "Bearer "
PEER_CERTIFICATE = "x509_pem_cert"

Context = grpc.aio.ServicerContext[Any, Any]
"""Servicer context of any call; the servicers are typed by their generated stubs."""


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


def device_certificate(context: Context) -> x509.Certificate:
    """The calling device's verified client certificate, or Unauthenticated (a stranger)."""
    cert = peer_certificate(context)
    if cert is None:
        raise Unauthenticated(
            "device calls need the device's client certificate, on the device (mutual TLS) endpoint",
            action="device.authenticate",
        )
    return cert


def device_holding(session: Session, cert: x509.Certificate) -> Device:
    """The device ``cert`` was issued to, read in ``session``, or Unauthenticated: a serial the
    CA never issued to a device, or a revoked certificate or device (which spends no
    rate-limit token: the caller is known). Run it in the transaction of the call's own work
    where there is one, so the call needs no transaction just to be authenticated."""
    held = devices.certificate_holder(session, serial=cert.serial_number)
    name = common_name(cert)[:64]
    if held is None or held[1].id != name:
        raise Unauthenticated(
            "this certificate was not issued to a device", action="device.authenticate", target=name
        )
    record, device = held
    revoked = (
        f"device {device.id} was revoked"
        if device.revoked_at is not None
        else "this certificate was revoked"
        if record.revoked_at is not None
        else None
    )
    if revoked is not None:
        raise Unauthenticated(
            revoked,
            charges=False,
            action="device.authenticate",
            target=device.id,
            actor=f"device:{device.id}",
        )
    return device


def calling_device(device: Device) -> Device:
    """Marks the call as ``device``'s own (its refusals are audited under its name)."""
    CALLER.set(Caller(actor=f"device:{device.id}", is_operator=False))
    return device


async def authenticate_device(db: Database, context: Context) -> Device:
    """Returns the calling device (and marks the call as its own), or raises Unauthenticated.
    A caller without a client certificate is a stranger; one whose certificate the fleet CA
    issued but that is revoked is not (it spends no rate-limit token)."""
    cert = device_certificate(context)
    # A read beside the writers (on SQLite the read-only pool): most device calls start here.
    return calling_device(await db.read(lambda s: device_holding(s, cert)))


async def authorize(db: Database, context: Context, needed: Role) -> OperatorIdentity:
    """The calling operator if its token grants ``needed`` (the call is then the operator's:
    its refusals are audited under its name); otherwise raises Unauthenticated for a missing
    or unknown token (a stranger's refusal), NotPermitted for too small a role."""
    token = bearer_from_metadata(context)
    if not token:
        raise Unauthenticated(
            "operator token missing (EDGEFLEET_OPERATOR_TOKEN)", action="operator.authenticate"
        )
    identity = await db.run(lambda s: identify(s, token=token)) if len(token) <= MAX_TOKEN_CHARS else None
    if identity is None:
        raise Unauthenticated("unknown or revoked operator token", action="operator.authenticate")
    CALLER.set(Caller(actor=identity.actor, is_operator=True))
    if identity.role < needed:
        raise NotPermitted(
            f"{identity.name} is a {identity.role.name.lower()}; this needs {needed.name.lower()}",
            action="operator.authorize",
        )
    return identity
