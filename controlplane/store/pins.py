"""Variant pins: a variant or a runtime pinned for one device or for the devices a label
selector matches, which pin is in force for a device, and setting or clearing one.

A device's own pin wins over group pins; among group pins the most recently set one wins.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from sqlmodel import Session, select

from edgefleet.controlplane.store.deployments import Release, device_releases, next_generation
from edgefleet.controlplane.store.errors import DeviceNotFound, InvalidPin
from edgefleet.controlplane.store.models import Device, VariantPinRule, utcnow
from edgefleet.controlplane.store.values import MAX_NAME_CHARS, as_utc
from edgefleet.protos.fleet import selectors
from edgefleet.protos.fleet.v1 import common_pb2

MAX_SCOPE_CHARS = 512  # VariantPinRule.scope
PINNABLE_FORMATS = frozenset(
    {common_pb2.MODEL_FORMAT_GGUF, common_pb2.MODEL_FORMAT_ONNX, common_pb2.MODEL_FORMAT_MLX}
)


def pin_scope(*, device_id: str | None, selector: Mapping[str, str]) -> str:
    """The scope key of a pin; raises InvalidPin unless exactly one scope is given."""
    if bool(device_id) == bool(selector):
        raise InvalidPin("give exactly one of a device id and a label selector")
    if device_id:
        return f"device:{device_id}"
    try:
        selectors.check_selector(selector)
    except selectors.InvalidLabels as exc:
        raise InvalidPin(str(exc)) from exc
    scope = f"labels:{selectors.to_text(selector)}"
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
        if pin.device_id is None and selectors.matches(device.labels, pin.selector):
            group.append(pin)
    if not group:
        return None
    return max(group, key=lambda p: (as_utc(p.updated_at), p.scope))


def pin_key(pin: VariantPinRule | None) -> tuple[str, int, str] | None:
    """What makes two pins in force the same for a device: a change of it re-assigns the device."""
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


def _check_pin(*, variant_id: str, fmt: int, clear: bool) -> None:
    if not clear and bool(variant_id) == bool(fmt):
        raise InvalidPin("pin exactly one of a variant id and a runtime (format)")
    if fmt and fmt not in PINNABLE_FORMATS:
        raise InvalidPin(f"format {fmt} cannot be pinned")
    if len(variant_id) > MAX_NAME_CHARS:
        raise InvalidPin(f"a variant id has at most {MAX_NAME_CHARS} characters")


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
    _check_pin(variant_id=variant_id, fmt=fmt, clear=clear)
    query = select(Device).with_for_update()
    if device_id:
        query = query.where(Device.id == device_id)
    devices = [d for d in session.exec(query).all() if device_id or selectors.matches(d.labels, selector)]
    if device_id and not devices:
        raise DeviceNotFound(f"unknown device {device_id}")
    pins = list(list_pins(session))
    before = {d.id: pin_key(effective_pin(pins, d)) for d in devices}
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
        if pin_key(pin) == before[device.id]:
            continue
        releases = device_releases(session, device.id)
        if not releases:
            continue
        repinned.append(Repinned(device.id, next_generation(session, device), releases, pin))
    return PinChange(changed=True, repinned=repinned)
