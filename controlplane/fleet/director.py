"""Signing a device's director targets with everything in force for it: every model it is
assigned, its variant pin and its config.

Every change of a device's assignment (Deploy, Undeploy, SetVariantPin, SetDeviceLabels, and
the rollout engine's releases, configs and rollbacks) signs through here, so none of them drops
what another set: a deploy keeps the device's config, a config rollout keeps its models and pin.
"""

from __future__ import annotations

from collections.abc import Sequence

from sqlmodel import Session

from edgefleet.controlplane.store.deployments import DeployedTo, Release, device_config
from edgefleet.controlplane.store.devices import devices_by_id
from edgefleet.controlplane.store.models import Device, VariantPinRule
from edgefleet.controlplane.store.pins import Repinned, effective_pin, list_pins
from edgefleet.controlplane.trust.director_rows import Assignment
from edgefleet.controlplane.trust.repositories import Repositories
from edgefleet.protos.fleet import selectors
from edgefleet.protos.fleet.v1 import common_pb2


def pin_message(rule: VariantPinRule | None) -> common_pb2.VariantPin | None:
    """A stored pin as the director signs it; ``scope`` tells the device where it came from."""
    if rule is None:
        return None
    return common_pb2.VariantPin(
        variant_id=rule.variant_id,
        format=rule.format,  # type: ignore[arg-type]
        scope="device" if rule.device_id else selectors.to_text(rule.selector),
    )


def sign(
    session: Session,
    repositories: Repositories,
    *,
    device: Device,
    generation: int,
    releases: Sequence[Release],
    pin: common_pb2.VariantPin | None,
) -> None:
    """Signs ``device``'s director targets at ``generation``: ``releases``, ``pin`` and the
    config stored on the device row."""
    repositories.assign(
        session,
        device_id=device.id,
        generation=generation,
        releases=releases,
        pin=pin,
        config=device_config(device),
    )


def sign_repinned(session: Session, repositories: Repositories, moved: Repinned) -> None:
    """Signs the director targets of a device whose pin in force changed: same releases, new
    generation, the new pin."""
    device = session.get(Device, moved.device_id)
    assert device is not None
    sign(
        session,
        repositories,
        device=device,
        generation=moved.generation,
        releases=moved.releases,
        pin=pin_message(moved.pin),
    )


def sign_changed(
    session: Session,
    repositories: Repositories,
    changed: Sequence[DeployedTo],
    *,
    pins: Sequence[VariantPinRule] | None = None,
) -> None:
    """Signs each changed device's director targets: all of its models, with the pin in force
    for it (of ``pins``, read here when not given) and its config. One batch
    (``Repositories.assign_many``): what the devices share is read once and every device's new
    metadata is stored in one bulk write."""
    rules = list_pins(session) if pins is None else pins
    devices = devices_by_id(session, [target.device_id for target in changed])
    assignments = []
    for target in changed:
        device = devices[target.device_id]
        assignments.append(
            Assignment(
                device_id=device.id,
                generation=target.generation,
                releases=target.releases,
                pin=pin_message(effective_pin(rules, device)),
                config=device_config(device),
            )
        )
    repositories.assign_many(session, assignments)
