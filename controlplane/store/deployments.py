"""Deployments: which releases each device is assigned, adding and removing them, its config,
and the generation every change of them moves the device to.

A device holds at most one release per bundle name; each change gives it a new generation,
which its director targets are signed at (``fleet.director``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sqlmodel import Session, col, select

from edgefleet.controlplane.store import bulk
from edgefleet.controlplane.store.devices import ID_CHUNK, announce_changes, locked_devices
from edgefleet.controlplane.store.models import Bundle, BundleArtifact, Deployment, Device, DeviceModel
from edgefleet.protos.fleet.device_config import config_from_json
from edgefleet.protos.fleet.v1 import common_pb2

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


def held_bundle_ids(session: Session, *, name: str, device_ids: Sequence[str]) -> dict[str, int]:
    """The bundle id of the release named ``name`` each listed device holds, in one query per
    ID_CHUNK devices; a device holding none is missing."""
    held: dict[str, int] = {}
    for start in range(0, len(device_ids), ID_CHUNK):
        chunk = list(device_ids[start : start + ID_CHUNK])
        rows = session.exec(
            select(DeviceModel.device_id, DeviceModel.bundle_id).where(
                DeviceModel.name == name, col(DeviceModel.device_id).in_(chunk)
            )
        ).all()
        held.update((device_id, bundle_id) for device_id, bundle_id in rows)
    return held


def deploy(session: Session, *, bundle: Bundle, device_ids: Sequence[str] | None) -> list[DeployedTo]:
    """Adds a bundle to devices' models (all devices when ``device_ids`` is None), replacing
    the release of the same name and keeping the others; each device gets a new generation.

    ``desired_bundle_id`` follows the most recent deployment, which is what the nudge names.
    The devices are locked and their models read in one query each; the model, device and
    deployment rows of all of them are written by one bulk statement per table
    (``store.bulk``), so a deploy to the whole fleet costs a few statements, not a few per
    device.
    """
    assert bundle.id is not None
    devices = locked_devices(session, device_ids)
    held = assigned_models(session, device_ids=None if device_ids is None else [d.id for d in devices])
    result: list[DeployedTo] = []
    replaced: list[str] = []  # devices holding a release of this name: their row is updated
    added: list[str] = []  # devices without one: a row is inserted
    for device in devices:
        others = [release for release in held.get(device.id, []) if release[0] != bundle.name]
        (replaced if len(others) < len(held.get(device.id, [])) else added).append(device.id)
        releases = sorted([*others, (bundle.name, bundle.version)], key=lambda release: release[0])
        result.append(DeployedTo(device.id, device.desired_generation + 1, releases))
    bulk.set_models(session, name=bundle.name, bundle_id=bundle.id, replaced=replaced, added=added)
    bulk.move_generations(session, devices, {d.device_id: d.generation for d in result}, bundle_id=bundle.id)
    bulk.record_deployments(session, [(d.device_id, bundle.id, d.generation) for d in result])
    announce_changes(session, [d.device_id for d in result])
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
    for device in locked_devices(session, device_ids, holding=name):
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
    announce_changes(session, [d.device_id for d in result])
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


def next_generation(session: Session, device: Device) -> int:
    """Moves the device to a new generation whose release set is unchanged, recording it as a
    deployment of its latest model (when it holds one), and returns it."""
    device.desired_generation += 1
    session.add(device)
    announce_changes(session, [device.id])
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
    device = locked_devices(session, [device_id])[0]
    device.config = dict(config)
    generation = next_generation(session, device)
    return DeployedTo(device.id, generation, device_releases(session, device.id))
