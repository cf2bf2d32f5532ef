"""Device labels: setting and removing them, and re-assigning a device whose group pin in
force changed with them. The form labels must have is ``edgefleet.protos.fleet.selectors``'.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from sqlmodel import Session

from edgefleet.controlplane.store.deployments import device_releases, next_generation
from edgefleet.controlplane.store.devices import locked_devices
from edgefleet.controlplane.store.pins import Repinned, effective_pin, list_pins, pin_key
from edgefleet.protos.fleet.selectors import MAX_LABELS, InvalidLabels, check_labels


@dataclass(frozen=True, slots=True)
class LabelChange:
    labels: dict[str, str]  # the device's labels afterwards
    repinned: Repinned | None  # set when a group pin started or stopped applying to it


def set_labels(
    session: Session, *, device_id: str, set_: Mapping[str, str], remove: Sequence[str]
) -> LabelChange:
    """Sets and removes labels of one device (removals first, so a key in both ends up set).

    Group pins select by label, so a change that moves the device into or out of one re-assigns
    it with the pin now in force, at a new generation (as ``pins.set_pin`` does for its devices).
    """
    check_labels(set_)
    if len(remove) > MAX_LABELS:
        raise InvalidLabels(f"at most {MAX_LABELS} labels to remove, got {len(remove)}")
    device = locked_devices(session, [device_id])[0]
    removed = set(remove)
    labels = {k: v for k, v in device.labels.items() if k not in removed}
    labels.update(set_)
    if len(labels) > MAX_LABELS:
        raise InvalidLabels(f"a device has at most {MAX_LABELS} labels")
    if labels == device.labels:
        return LabelChange(labels=labels, repinned=None)
    pins = list(list_pins(session))
    before = pin_key(effective_pin(pins, device))
    device.labels = labels
    session.add(device)
    pin = effective_pin(pins, device)
    releases = device_releases(session, device.id)
    if pin_key(pin) == before or not releases:
        return LabelChange(labels=labels, repinned=None)
    generation = next_generation(session, device)
    return LabelChange(labels=labels, repinned=Repinned(device.id, generation, releases, pin))
