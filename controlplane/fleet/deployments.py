"""Deploying a release to devices and removing a model from them: each one transaction that
changes the devices' models, re-signs their director targets and records the change in the
audit trail, so the three land together or not at all.

Callers run them inside one session scope (``Database.run``) and wake the returned devices.
"""

from __future__ import annotations

from collections.abc import Sequence

from sqlmodel import Session

from edgefleet.controlplane.fleet import audit, director
from edgefleet.controlplane.store import bundles, deployments
from edgefleet.controlplane.store.deployments import DeployedTo
from edgefleet.controlplane.trust.repositories import Repositories


def deploy(
    session: Session,
    repositories: Repositories,
    *,
    actor: str,
    name: str,
    version: int,
    device_ids: Sequence[str] | None,
) -> list[DeployedTo]:
    """Adds release ``name@version`` to the devices' models (every device when ``device_ids``
    is None), replacing the release of the same name; raises BundleNotFound, DeviceNotFound
    or RepositoryRefusal."""
    bundle = bundles.get_bundle(session, name=name, version=version)
    assert bundle is not None
    deployed = deployments.deploy(session, bundle=bundle, device_ids=device_ids)
    director.sign_changed(session, repositories, deployed)
    audit.record(
        session,
        actor=actor,
        action="deploy",
        target=f"{name}@{version}",
        detail={"count": len(deployed), "devices": {d.device_id: d.generation for d in deployed}},
    )
    return deployed


def undeploy(
    session: Session,
    repositories: Repositories,
    *,
    actor: str,
    name: str,
    device_ids: Sequence[str] | None,
) -> list[DeployedTo]:
    """Removes the model ``name`` from the devices that hold it (of ``device_ids``, or all);
    each gets director targets listing its remaining models (none is a valid assignment)."""
    changed = deployments.undeploy(session, name=name, device_ids=device_ids)
    director.sign_changed(session, repositories, changed)
    audit.record(
        session,
        actor=actor,
        action="undeploy",
        target=name,
        detail={"devices": {d.device_id: d.generation for d in changed}},
    )
    return changed
