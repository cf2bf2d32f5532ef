"""Revoking a device: one transaction that marks it and every certificate it holds revoked and
records it in the audit trail. Re-issuing the CRL and ending its sessions follow it (the
caller's ``on_device_revoked``)."""

from __future__ import annotations

from sqlmodel import Session

from edgefleet.controlplane.fleet import audit
from edgefleet.controlplane.store import devices
from edgefleet.controlplane.store.errors import DeviceNotFound
from edgefleet.controlplane.store.models import Device, utcnow
from edgefleet.controlplane.store.values import clip


def revoke_device(session: Session, *, actor: str, device_id: str) -> bool:
    """Revokes the device; False when it already was. Raises DeviceNotFound."""
    device = session.get(Device, device_id)
    if device is None:
        raise DeviceNotFound(f"unknown device {clip(device_id, 64)}")
    if device.revoked_at is not None:
        return False
    device.revoked_at = utcnow()
    session.add(device)
    certificates = devices.revoke_certificates(session, device_id=device.id, when=device.revoked_at)
    devices.announce_changes(session, [device.id], revoked=True)  # every replica ends its stream
    audit.record(
        session,
        actor=actor,
        action="device.revoke",
        target=device.id,
        detail={"certificates": certificates},
    )
    return True
