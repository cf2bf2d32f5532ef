"""Setting and clearing variant pins, and changing device labels (which decide the group pins
a device falls under): each one transaction that changes the rows, re-signs the director
targets of every device whose pin in force changed, and records the change in the audit trail.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from sqlmodel import Session

from edgefleet.controlplane.fleet import audit, director
from edgefleet.controlplane.store import labels, pins
from edgefleet.controlplane.store.labels import LabelChange
from edgefleet.controlplane.store.pins import PinChange
from edgefleet.controlplane.trust.repositories import Repositories
from edgefleet.protos.fleet import selectors
from edgefleet.protos.fleet.v1 import common_pb2


def pin_action(*, clear: bool) -> str:
    return "pin.clear" if clear else "pin.set"


def pin_target(*, device_id: str, selector: Mapping[str, str]) -> str:
    """How the audit trail names a pin's scope: ``device:ID`` or ``labels:KEY=VALUE,...``."""
    return f"device:{device_id}" if device_id else f"labels:{selectors.to_text(selector)}"


def set_pin(
    session: Session,
    repositories: Repositories,
    *,
    actor: str,
    device_id: str,
    selector: Mapping[str, str],
    variant_id: str,
    fmt: int,
    clear: bool,
) -> PinChange:
    """Sets (or clears) the pin of one device or one selector; every device whose pin in force
    changed is re-assigned its releases at a new generation and chooses its variant again.
    Raises InvalidPin, DeviceNotFound or RepositoryRefusal."""
    change = pins.set_pin(
        session,
        device_id=device_id or None,
        selector=selector,
        variant_id="" if clear else variant_id,
        fmt=0 if clear else fmt,
        clear=clear,
        actor=actor,
    )
    for moved in change.repinned:
        director.sign_repinned(session, repositories, moved)
    detail: dict[str, object] = {
        "changed": change.changed,
        "devices": {m.device_id: m.generation for m in change.repinned},
    }
    if not clear:
        detail["variant"] = variant_id or None
        detail["runtime"] = common_pb2.ModelFormat.Name(fmt) if fmt else None
    audit.record(
        session,
        actor=actor,
        action=pin_action(clear=clear),
        target=pin_target(device_id=device_id, selector=selector),
        detail=detail,
    )
    return change


def set_labels(
    session: Session,
    repositories: Repositories,
    *,
    actor: str,
    device_id: str,
    set_: Mapping[str, str],
    remove: Sequence[str],
) -> LabelChange:
    """Sets and removes labels of one device; a change that moves it into or out of a group
    pin re-signs its director targets with the pin now in force. Raises InvalidLabels,
    DeviceNotFound or RepositoryRefusal."""
    change = labels.set_labels(session, device_id=device_id, set_=set_, remove=remove)
    moved = change.repinned
    if moved is not None:
        director.sign_repinned(session, repositories, moved)
    audit.record(
        session,
        actor=actor,
        action="device.labels",
        target=device_id,
        detail={
            "set": dict(set_),
            "remove": list(remove),
            "labels": change.labels,
            "generation": moved.generation if moved else None,
        },
    )
    return change
