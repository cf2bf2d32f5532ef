"""Keyword-only CRUD functions over a SQLModel session; the servicers stay thin.

Each function does one unit of work and leaves committing to the caller's session scope
(``with Session(engine) as s, s.begin():``), except where atomicity needs its own statement.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import and_, or_, update
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, select

from edgefleet.controlplane.api.limits import MAX_NAME_CHARS, clip, first_few
from edgefleet.controlplane.store.models import (
    Bundle,
    BundleArtifact,
    Deployment,
    Device,
    DeviceCertificate,
    DeviceModel,
    EnrollmentToken,
    TelemetryRecord,
    VariantPinRule,
    utcnow,
)
from edgefleet.protos.fleet.device_config import config_from_json
from edgefleet.protos.fleet.release import VerifiedRelease, manifest_to_json
from edgefleet.protos.fleet.v1 import common_pb2


class StoreError(Exception):
    """Base of store refusals that operators and devices should see as such."""


class TokenRejected(StoreError):
    """The bootstrap token is unknown, used up or expired."""


class BundleExists(StoreError):
    """A bundle with that name and version was already pushed with different metadata."""


class BundleNotFound(StoreError):
    """No bundle with that name and version."""


class DeviceNotFound(StoreError):
    """No device with that id."""


class InvalidPin(StoreError):
    """A pin request that names no scope, two scopes, or not exactly one of variant and format."""


def as_utc(value: datetime) -> datetime:
    """SQLite returns naive datetimes; everything here is UTC."""
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def create_token(
    session: Session, *, token_sha256: str, uses: int, ttl: timedelta, labels: dict[str, str]
) -> EnrollmentToken:
    row = EnrollmentToken(
        token_sha256=token_sha256, uses_left=uses, expires_at=utcnow() + ttl, labels=dict(labels)
    )
    session.add(row)
    return row


def consume_token(session: Session, *, token_sha256: str) -> EnrollmentToken:
    """Uses one enrollment of a token, atomically, so two devices cannot share a single-use token."""
    table = EnrollmentToken.__table__  # type: ignore[attr-defined]
    result = session.execute(
        update(table)
        .where(table.c.token_sha256 == token_sha256)
        .where(table.c.uses_left > 0)
        .where(table.c.expires_at > utcnow())
        .values(uses_left=table.c.uses_left - 1)
    )
    if result.rowcount != 1:  # type: ignore[attr-defined]
        row = session.get(EnrollmentToken, token_sha256)
        if row is None:
            raise TokenRejected("unknown enrollment token")
        if row.uses_left <= 0:
            raise TokenRejected("enrollment token has already been used")
        raise TokenRejected("enrollment token has expired")
    row = session.get(EnrollmentToken, token_sha256)
    assert row is not None
    return row


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


def add_bundle(session: Session, *, release: VerifiedRelease) -> tuple[Bundle, bool]:
    """Records a verified release; returns (bundle, already_present). Same bytes twice is idempotent."""
    existing = get_bundle(session, name=release.name, version=release.version, missing_ok=True)
    if existing is not None:
        if existing.release_metadata != release.metadata:
            raise BundleExists(
                f"{release.name}@{release.version} already exists with different metadata; "
                "push a higher version instead"
            )
        return existing, True
    bundle = Bundle(
        name=release.name,
        version=release.version,
        release_metadata=release.metadata,
        manifest_json=json.dumps(manifest_to_json(release.manifest)),
        expires_at=release.expires,
        total_bytes=sum(a.length for a in release.artifacts.values()),
    )
    session.add(bundle)
    try:
        session.flush()
    except IntegrityError as exc:
        raise BundleExists(f"{release.name}@{release.version} was pushed concurrently") from exc
    assert bundle.id is not None
    for info in release.artifacts.values():
        session.add(
            BundleArtifact(bundle_id=bundle.id, path=info.path, sha256=info.sha256, length=info.length)
        )
    return bundle, False


def get_bundle(session: Session, *, name: str, version: int, missing_ok: bool = False) -> Bundle | None:
    bundle = session.exec(select(Bundle).where(Bundle.name == name, Bundle.version == version)).first()
    if bundle is None and not missing_ok:
        raise BundleNotFound(f"no bundle {name}@{version}; push it first")
    return bundle


def list_bundles(
    session: Session, *, after: tuple[str, int] | None = None, limit: int | None = None
) -> Sequence[Bundle]:
    """Bundles by name and version, from the one after (name, version) ``after`` on."""
    query = select(Bundle)
    if after is not None:
        name, version = after
        query = query.where(
            or_(col(Bundle.name) > name, and_(col(Bundle.name) == name, col(Bundle.version) > version))
        )
    query = query.order_by(col(Bundle.name), col(Bundle.version))
    return session.exec(query if limit is None else query.limit(limit)).all()


Release = tuple[str, int]  # (bundle name, version)


@dataclass(frozen=True, slots=True)
class DeployedTo:
    """A device whose set of models changed: it must be re-assigned (new director targets)
    listing exactly ``releases`` at ``generation``."""

    device_id: str
    generation: int
    releases: list[Release]  # every model the device now holds, sorted by name


def device_releases(session: Session, device_id: str) -> list[Release]:
    """The releases assigned to a device, one per bundle name, sorted by name: what its
    director targets must list."""
    session.flush()  # rows added or deleted in this transaction count
    rows = session.exec(
        select(Bundle.name, Bundle.version)
        .join(DeviceModel, col(DeviceModel.bundle_id) == col(Bundle.id))
        .where(DeviceModel.device_id == device_id)
        .order_by(col(Bundle.name))
    ).all()
    return [(name, version) for name, version in rows]


def assigned_models(session: Session, *, device_ids: Sequence[str] | None = None) -> dict[str, list[Release]]:
    """Every device's (or those of ``device_ids``) assigned releases, sorted by name, in one
    query, for fleet listings."""
    query = select(DeviceModel.device_id, Bundle.name, Bundle.version).join(
        Bundle, col(DeviceModel.bundle_id) == col(Bundle.id)
    )
    if device_ids is not None:
        query = query.where(col(DeviceModel.device_id).in_(list(device_ids)))
    rows = session.exec(query.order_by(col(DeviceModel.device_id), col(Bundle.name))).all()
    result: dict[str, list[Release]] = {}
    for device_id, name, version in rows:
        result.setdefault(device_id, []).append((name, version))
    return result


def _locked_devices(
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


def _assign_model(session: Session, device: Device, bundle: Bundle) -> None:
    """Adds ``bundle`` to the device's models, replacing the release of the same name."""
    assert bundle.id is not None
    row = session.get(DeviceModel, (device.id, bundle.name))
    if row is None:
        row = DeviceModel(device_id=device.id, name=bundle.name, bundle_id=bundle.id)
    row.bundle_id = bundle.id
    session.add(row)


def deploy(session: Session, *, bundle: Bundle, device_ids: Sequence[str] | None) -> list[DeployedTo]:
    """Adds a bundle to devices' models (all devices when ``device_ids`` is None), replacing
    the release of the same name and keeping the others; each device gets a new generation.

    ``desired_bundle_id`` follows the most recent deployment, which is what the nudge names.
    """
    assert bundle.id is not None
    result = []
    for device in _locked_devices(session, device_ids):
        _assign_model(session, device, bundle)
        device.desired_generation += 1
        device.desired_bundle_id = bundle.id
        session.add(device)
        session.add(
            Deployment(device_id=device.id, bundle_id=bundle.id, generation=device.desired_generation)
        )
        result.append(DeployedTo(device.id, device.desired_generation, device_releases(session, device.id)))
    return result


def _latest_remaining(session: Session, device_id: str) -> int | None:
    """The bundle id of the device's most recently pushed remaining model, or None."""
    session.flush()
    return session.exec(
        select(DeviceModel.bundle_id)
        .where(DeviceModel.device_id == device_id)
        .order_by(col(DeviceModel.bundle_id).desc())
        .limit(1)
    ).first()


def undeploy(session: Session, *, name: str, device_ids: Sequence[str] | None) -> list[DeployedTo]:
    """Removes the model ``name`` from devices (every device holding it when ``device_ids`` is
    None); each one that held it gets a new generation. Devices without it are left untouched
    and not returned: there is nothing to re-sign for them.
    """
    result = []
    for device in _locked_devices(session, device_ids, holding=name):
        row = session.get(DeviceModel, (device.id, name))
        if row is None:
            continue
        session.delete(row)
        desired = session.get(Bundle, device.desired_bundle_id) if device.desired_bundle_id else None
        if desired is None or desired.name == name:
            device.desired_bundle_id = _latest_remaining(session, device.id)
        device.desired_generation += 1
        session.add(device)
        result.append(DeployedTo(device.id, device.desired_generation, device_releases(session, device.id)))
    return result


def artifact_deployed_to(session: Session, *, device_id: str, sha256: str) -> bool:
    """Devices may fetch only artifacts of bundles that were deployed to them."""
    query = (
        select(BundleArtifact.sha256)
        .join(Deployment, col(Deployment.bundle_id) == col(BundleArtifact.bundle_id))
        .where(Deployment.device_id == device_id, BundleArtifact.sha256 == sha256)
        .limit(1)
    )
    return session.exec(query).first() is not None


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


def query_telemetry(
    session: Session, *, device_id: str | None, kind: str | None, limit: int, before: int | None = None
) -> Sequence[TelemetryRecord]:
    """The newest matching records first, older than record id ``before`` when given."""
    query = select(TelemetryRecord)
    if device_id:
        query = query.where(TelemetryRecord.device_id == device_id)
    if kind:
        query = query.where(TelemetryRecord.kind == kind)
    if before is not None:
        query = query.where(col(TelemetryRecord.id) < before)
    return session.exec(query.order_by(col(TelemetryRecord.id).desc()).limit(limit)).all()


# -- variant pins ----------------------------------------------------------------------------

MAX_SCOPE_CHARS = 512  # VariantPinRule.scope
PINNABLE_FORMATS = frozenset(
    {common_pb2.MODEL_FORMAT_GGUF, common_pb2.MODEL_FORMAT_ONNX, common_pb2.MODEL_FORMAT_MLX}
)


def selector_text(selector: Mapping[str, str]) -> str:
    """ "hw=jetson,site=a": the canonical, sorted form used as a scope key and shown to people."""
    return ",".join(f"{k}={v}" for k, v in sorted(selector.items()))


def pin_scope(*, device_id: str | None, selector: Mapping[str, str]) -> str:
    """The scope key of a pin; raises InvalidPin unless exactly one scope is given."""
    if bool(device_id) == bool(selector):
        raise InvalidPin("give exactly one of a device id and a label selector")
    if device_id:
        return f"device:{device_id}"
    try:
        check_selector(selector)
    except InvalidLabels as exc:
        raise InvalidPin(str(exc)) from exc
    scope = f"labels:{selector_text(selector)}"
    if len(scope) > MAX_SCOPE_CHARS:
        raise InvalidPin(f"a pin's selector is at most {MAX_SCOPE_CHARS - 7} characters as KEY=VALUE,...")
    return scope


def list_pins(session: Session) -> Sequence[VariantPinRule]:
    return session.exec(select(VariantPinRule)).all()


def effective_pin(pins: Sequence[VariantPinRule], device: Device) -> VariantPinRule | None:
    """The pin in force for ``device``: its own pin, else the most recently set group pin whose
    selector its labels match (ties by scope, so the answer never depends on row order)."""
    group: list[VariantPinRule] = []
    for pin in pins:
        if pin.device_id == device.id:
            return pin
        if pin.device_id is None and selector_matches(device.labels, pin.selector):
            group.append(pin)
    if not group:
        return None
    return max(group, key=lambda p: (as_utc(p.updated_at), p.scope))


def _pin_key(pin: VariantPinRule | None) -> tuple[str, int, str] | None:
    return None if pin is None else (pin.variant_id, pin.format, pin.scope)


@dataclass(frozen=True, slots=True)
class Repinned:
    """A device whose pin in force changed while it holds models: it must be re-assigned (new
    director targets listing all of ``releases``, with the new pin) at ``generation``."""

    device_id: str
    generation: int
    releases: list[Release]  # every model the device holds, sorted by name
    pin: VariantPinRule | None


@dataclass(frozen=True, slots=True)
class PinChange:
    changed: bool  # False: the scope already had exactly this pin, or there was none to clear
    repinned: list[Repinned]


def set_pin(
    session: Session,
    *,
    device_id: str | None,
    selector: Mapping[str, str],
    variant_id: str,
    fmt: int,
    clear: bool,
    actor: str,
) -> PinChange:
    """Sets or clears one scope's pin; devices whose pin in force changed get a new generation.

    Devices holding no model only keep the pin for their next deployment.
    """
    scope = pin_scope(device_id=device_id, selector=selector)
    if not clear and bool(variant_id) == bool(fmt):
        raise InvalidPin("pin exactly one of a variant id and a runtime (format)")
    if fmt and fmt not in PINNABLE_FORMATS:
        raise InvalidPin(f"format {fmt} cannot be pinned")
    if len(variant_id) > MAX_NAME_CHARS:
        raise InvalidPin(f"a variant id has at most {MAX_NAME_CHARS} characters")
    query = select(Device).with_for_update()
    if device_id:
        query = query.where(Device.id == device_id)
    devices = [d for d in session.exec(query).all() if device_id or selector_matches(d.labels, selector)]
    if device_id and not devices:
        raise DeviceNotFound(f"unknown device {device_id}")
    pins = list(list_pins(session))
    before = {d.id: _pin_key(effective_pin(pins, d)) for d in devices}
    row = session.get(VariantPinRule, scope)
    if clear:
        if row is None:
            return PinChange(changed=False, repinned=[])
        session.delete(row)
    else:
        if row is not None and (row.variant_id, row.format) == (variant_id, fmt):
            return PinChange(changed=False, repinned=[])
        row = row or VariantPinRule(scope=scope, device_id=device_id or None, selector=dict(selector))
        row.variant_id, row.format, row.set_by, row.updated_at = variant_id, fmt, actor, utcnow()
        session.add(row)
    session.flush()
    pins = list(list_pins(session))
    repinned = []
    for device in devices:
        pin = effective_pin(pins, device)
        if _pin_key(pin) == before[device.id]:
            continue
        releases = device_releases(session, device.id)
        if not releases:
            continue
        repinned.append(Repinned(device.id, _next_generation(session, device), releases, pin))
    return PinChange(changed=True, repinned=repinned)


# -- labels and configs ----------------------------------------------------------------------

MAX_LABELS = 32
MAX_LABEL_KEY = 63
MAX_LABEL_VALUE = 128
LABEL_KEY = re.compile(rf"[A-Za-z0-9][A-Za-z0-9._/-]{{0,{MAX_LABEL_KEY - 1}}}")
LABEL_VALUE = re.compile(rf"[A-Za-z0-9._:/@+-]{{0,{MAX_LABEL_VALUE}}}")


class InvalidLabels(StoreError):
    """Labels or a selector that are not KEY=VALUE as selectors write them, or too many."""


def check_labels(labels: Mapping[str, str], *, what: str = "label") -> None:
    """Raises InvalidLabels unless there are at most MAX_LABELS items and each can be written
    as KEY=VALUE in a selector ("hw=jetson,site=a") and a shell word: a key of 1-63 letters,
    digits, '.', '_', '/' or '-' starting with a letter or digit; a value of at most 128 of
    those or ':', '@', '+'. Labels are listed with every device and compared by every
    selector, so they are small by construction."""
    if len(labels) > MAX_LABELS:
        raise InvalidLabels(f"at most {MAX_LABELS} {what}s, got {len(labels)}")
    for key, value in labels.items():
        if not LABEL_KEY.fullmatch(key):
            raise InvalidLabels(
                f"{what} {clip(key, 40)!r} is not KEY=VALUE as selectors write it: a key is "
                f"1-{MAX_LABEL_KEY} letters, digits, '.', '_', '/' or '-' starting with a letter or digit"
            )
        if not LABEL_VALUE.fullmatch(value):
            raise InvalidLabels(
                f"{what} {key}={clip(value, 40)!r} is not KEY=VALUE as selectors write it: a value is "
                f"at most {MAX_LABEL_VALUE} letters, digits, '.', '_', '/', '-', ':', '@' or '+'"
            )


def check_selector(selector: Mapping[str, str], *, what: str = "selector") -> None:
    """A label selector has the form and bounds of labels (``check_labels``)."""
    check_labels(selector, what=what)


def selector_matches(labels: Mapping[str, str], selector: Mapping[str, str]) -> bool:
    """A device matches a selector when it has every key with the same value (empty: all)."""
    return all(labels.get(k) == v for k, v in selector.items())


@dataclass(frozen=True, slots=True)
class LabelChange:
    labels: dict[str, str]  # the device's labels afterwards
    repinned: Repinned | None  # set when a group pin started or stopped applying to it


def set_labels(
    session: Session, *, device_id: str, set_: Mapping[str, str], remove: Sequence[str]
) -> LabelChange:
    """Sets and removes labels of one device (removals first, so a key in both ends up set).

    Group pins select by label, so a change that moves the device into or out of one re-assigns
    it with the pin now in force, at a new generation (as ``set_pin`` does for its devices).
    """
    check_labels(set_)
    if len(remove) > MAX_LABELS:
        raise InvalidLabels(f"at most {MAX_LABELS} labels to remove, got {len(remove)}")
    devices = _locked_devices(session, [device_id])
    device = devices[0]
    removed = set(remove)
    labels = {k: v for k, v in device.labels.items() if k not in removed}
    labels.update(set_)
    if len(labels) > MAX_LABELS:
        raise InvalidLabels(f"a device has at most {MAX_LABELS} labels")
    if labels == device.labels:
        return LabelChange(labels=labels, repinned=None)
    pins = list(list_pins(session))
    before = _pin_key(effective_pin(pins, device))
    device.labels = labels
    session.add(device)
    pin = effective_pin(pins, device)
    releases = device_releases(session, device.id)
    if _pin_key(pin) == before or not releases:
        return LabelChange(labels=labels, repinned=None)
    generation = _next_generation(session, device)
    return LabelChange(labels=labels, repinned=Repinned(device.id, generation, releases, pin))


def _next_generation(session: Session, device: Device) -> int:
    """Moves the device to a new generation whose release set is unchanged, recording it as a
    deployment of its latest model (when it holds one), and returns it."""
    device.desired_generation += 1
    session.add(device)
    if device.desired_bundle_id is not None:
        session.add(
            Deployment(
                device_id=device.id, bundle_id=device.desired_bundle_id, generation=device.desired_generation
            )
        )
    return device.desired_generation


def device_config(device: Device) -> common_pb2.DeviceConfig | None:
    """The DeviceConfig in force for the device, None when it has none."""
    return config_from_json(device.config) if device.config else None


def set_config(session: Session, *, device_id: str, config: Mapping[str, Any]) -> DeployedTo:
    """Makes ``config`` (stored form; {}: none) the device's config and moves it to a new
    generation, which its director targets must be signed at, listing its models as they are."""
    device = _locked_devices(session, [device_id])[0]
    device.config = dict(config)
    generation = _next_generation(session, device)
    return DeployedTo(device.id, generation, device_releases(session, device.id))
