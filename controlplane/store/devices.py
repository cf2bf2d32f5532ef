"""Devices and their certificates: enrollment rows, the fleet listing, locking devices for a
change, and the certificate records revocation and device authentication read.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from sqlalchemy import and_, or_
from sqlmodel import Session, col, select

from edgefleet.controlplane.store.errors import DeviceNotFound
from edgefleet.controlplane.store.models import Device, DeviceCertificate, DeviceModel
from edgefleet.controlplane.store.values import as_utc, first_few


def create_device(
    session: Session, *, device_id: str, hostname: str, labels: dict[str, str], enrollment_sha256: str = ""
) -> Device:
    device = Device(id=device_id, hostname=hostname, labels=labels, enrollment_sha256=enrollment_sha256)
    session.add(device)
    session.flush()  # the certificate row that follows refers to it
    return device


def device_enrolled_as(session: Session, *, enrollment_sha256: str) -> Device | None:
    """The unrevoked device an earlier enrollment with this token and key created, if any."""
    return session.exec(
        select(Device).where(Device.enrollment_sha256 == enrollment_sha256, col(Device.revoked_at).is_(None))
    ).first()


def list_devices(session: Session, *, after: str | None = None, limit: int | None = None) -> Sequence[Device]:
    """Devices in enrollment order (ties by id), from the one after device ``after`` on.

    The page position is a device id, not its enrollment time, so no timestamp travels in a
    page token and none is compared across time zones or database dialects.
    """
    query = select(Device)
    if after is not None:
        last = select(Device.enrolled_at).where(Device.id == after).scalar_subquery()
        query = query.where(
            or_(
                col(Device.enrolled_at) > last,
                and_(col(Device.enrolled_at) == last, col(Device.id) > after),
            )
        )
    query = query.order_by(col(Device.enrolled_at), col(Device.id))
    return session.exec(query if limit is None else query.limit(limit)).all()


def locked_devices(
    session: Session, device_ids: Sequence[str] | None, *, holding: str | None = None
) -> Sequence[Device]:
    """Locks the devices a change is about, so concurrent changes to one device's models and
    generation serialize: ``device_ids``, else every device (holding the model ``holding``,
    when given). Raises DeviceNotFound naming every unknown id."""
    query = select(Device)
    if device_ids is not None:
        query = query.where(col(Device.id).in_(list(device_ids)))
    elif holding is not None:
        holders = select(DeviceModel.device_id).where(DeviceModel.name == holding)
        query = query.where(col(Device.id).in_(holders))
    devices = session.exec(query.order_by(col(Device.id)).with_for_update()).all()
    if device_ids is not None:
        missing = set(device_ids) - {d.id for d in devices}
        if missing:
            raise DeviceNotFound(first_few(missing, what="unknown device id(s)"))
    return devices


def record_certificate(session: Session, *, device_id: str, serial: int, not_after: datetime) -> None:
    session.add(DeviceCertificate(serial=format(serial, "x"), device_id=device_id, not_after=not_after))


def certificate_holder(session: Session, *, serial: int) -> tuple[DeviceCertificate, Device] | None:
    """The certificate row and its device, or None for a serial the CA never issued to a device."""
    cert = session.get(DeviceCertificate, format(serial, "x"))
    if cert is None:
        return None
    device = session.get(Device, cert.device_id)
    return None if device is None else (cert, device)


def revoke_certificates(session: Session, *, device_id: str, when: datetime) -> int:
    """Marks every unrevoked certificate of the device revoked; returns how many."""
    rows = session.exec(
        select(DeviceCertificate).where(
            DeviceCertificate.device_id == device_id, col(DeviceCertificate.revoked_at).is_(None)
        )
    ).all()
    for row in rows:
        row.revoked_at = when
        session.add(row)
    return len(rows)


def revoked_certificates(session: Session, *, now: datetime) -> list[tuple[int, datetime]]:
    """(serial, revoked at) of revoked certificates that have not expired yet: the CRL's entries.
    Expired ones drop out, as RFC 5280 allows, so the list stays as small as the live fleet."""
    rows = session.exec(
        select(DeviceCertificate).where(
            col(DeviceCertificate.revoked_at).is_not(None), col(DeviceCertificate.not_after) > now
        )
    ).all()
    return [(int(row.serial, 16), as_utc(row.revoked_at)) for row in rows if row.revoked_at is not None]
