"""Devices and their certificates: enrollment rows, the fleet listing, locking devices for a
change, and the certificate records revocation and device authentication read.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import and_, event, or_, text
from sqlalchemy.orm.util import identity_key
from sqlmodel import Session, col, select

from edgefleet.controlplane.store.errors import DeviceNotFound
from edgefleet.controlplane.store.models import Bundle, Device, DeviceCertificate, DeviceModel
from edgefleet.controlplane.store.values import as_utc, first_few

ID_CHUNK = 5000  # ids per IN list: well under SQLite's and PostgreSQL's bound-parameter limits


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


def devices_by_id(session: Session, device_ids: Sequence[str]) -> dict[str, Device]:
    """The listed devices by id; an unknown id is missing. Like ``session.get`` for each, those
    the session holds already (a deploy's locked devices, say) are taken as they are; the others
    are read in one query per ID_CHUNK ids."""
    found: dict[str, Device] = {}
    missing: list[str] = []
    for device_id in device_ids:
        held = session.identity_map.get(identity_key(Device, device_id))
        if isinstance(held, Device):
            found[device_id] = held
        else:
            missing.append(device_id)
    for start in range(0, len(missing), ID_CHUNK):
        chunk = missing[start : start + ID_CHUNK]
        found.update((d.id, d) for d in session.exec(select(Device).where(col(Device.id).in_(chunk))).all())
    return found


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


# Change notices: PostgreSQL LISTEN/NOTIFY carries them to every replica, delivered at commit
# (and never when the transaction rolls back). See fleet/changes.py for the listening side.
CHANGES_CHANNEL = "edgefleet_desired_state"
MAX_NOTICE_BYTES = 7900  # PostgreSQL refuses payloads of 8000 bytes or more
NOTICE_CHANGED = "g"  # "g:<id>,<id>,...": these devices' desired state moved
NOTICE_REVOKED = "r"  # "r:<id>,...": these devices were revoked; their streams end
NOTICE_ALL = "*"  # too many ids for one payload: every replica re-checks all its streams
_PENDING_NOTICES = "edgefleet.pending_notices"


def announce_changes(session: Session, device_ids: Sequence[str], *, revoked: bool = False) -> None:
    """Queues a notice that these devices' desired state changed (or that they were revoked),
    sent once when ``session`` commits, in that same transaction, so every replica's listener
    hears of a change exactly when it becomes visible. SQLite (one node) has no listeners: the
    in-process notifier is all there is, and nothing is queued."""
    if not device_ids or session.get_bind().dialect.name != "postgresql":
        return
    pending: dict[str, set[str]] | None = session.info.get(_PENDING_NOTICES)
    if pending is None:
        pending = {NOTICE_CHANGED: set(), NOTICE_REVOKED: set()}
        session.info[_PENDING_NOTICES] = pending
        event.listen(session, "before_commit", _send_notices, once=True)
        event.listen(session, "after_rollback", _drop_notices, once=True)
    pending[NOTICE_REVOKED if revoked else NOTICE_CHANGED].update(device_ids)


def notice_payloads(kind: str, device_ids: set[str]) -> list[str]:
    """The payloads announcing ``device_ids``: one, each under MAX_NOTICE_BYTES, or ``*`` when
    they would not fit in one (a bulk change: listeners resolve it with one query)."""
    if not device_ids:
        return []
    payload = f"{kind}:{','.join(sorted(device_ids))}"
    return [payload] if len(payload.encode()) <= MAX_NOTICE_BYTES else [NOTICE_ALL]


def _send_notices(session: Session) -> None:
    pending: dict[str, set[str]] = session.info.pop(_PENDING_NOTICES, {})
    for kind, ids in pending.items():
        for payload in notice_payloads(kind, ids):
            session.execute(
                text("SELECT pg_notify(:channel, :payload)"), {"channel": CHANGES_CHANNEL, "payload": payload}
            )


def _drop_notices(session: Session) -> None:
    session.info.pop(_PENDING_NOTICES, None)  # rolled back: nothing changed, nothing to tell


def desired_generations(session: Session, device_ids: Sequence[str]) -> dict[str, int | None]:
    """Each listed device's desired generation, None for one revoked; a device removed is
    missing. One query for all of a replica's connected streams: the periodic safety net."""
    if not device_ids:
        return {}
    rows = session.exec(
        select(Device.id, Device.desired_generation, Device.revoked_at).where(
            col(Device.id).in_(list(device_ids))
        )
    ).all()
    return {
        device_id: None if revoked_at is not None else generation
        for device_id, generation, revoked_at in rows
    }


@dataclass(frozen=True, slots=True)
class DesiredRow:
    """What a desired-state stream needs of one device: its generation, whether it was revoked,
    and the name and version of its most recently deployed bundle (None: none)."""

    generation: int
    revoked: bool
    bundle_name: str | None
    bundle_version: int | None


def desired_rows(session: Session, device_ids: Sequence[str]) -> dict[str, DesiredRow]:
    """Each listed device's desired state, read in one query per ID_CHUNK ids, and their
    bundles' names in one more (a deploy names one or a few); a device removed is missing. The
    batched read behind every woken desired-state stream of a replica, instead of one
    transaction per stream."""
    rows: list[tuple[str, int, bool, int | None]] = []
    ids = list(dict.fromkeys(device_ids))
    for start in range(0, len(ids), ID_CHUNK):
        chunk = ids[start : start + ID_CHUNK]
        rows.extend(
            (device_id, generation, revoked_at is not None, bundle_id)
            for device_id, generation, revoked_at, bundle_id in session.exec(
                select(
                    Device.id, Device.desired_generation, Device.revoked_at, Device.desired_bundle_id
                ).where(col(Device.id).in_(chunk))
            ).all()
        )
    wanted = {bundle_id for *_, bundle_id in rows if bundle_id is not None}
    bundles = (
        {
            bundle_id: (name, version)
            for bundle_id, name, version in session.exec(
                select(Bundle.id, Bundle.name, Bundle.version).where(col(Bundle.id).in_(sorted(wanted)))
            ).all()
        }
        if wanted
        else {}
    )
    found: dict[str, DesiredRow] = {}
    for device_id, generation, revoked, bundle_id in rows:
        name, version = bundles.get(bundle_id, (None, None)) if bundle_id is not None else (None, None)
        found[device_id] = DesiredRow(generation, revoked, name, version)
    return found
