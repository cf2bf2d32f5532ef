"""The desired state each device is told of: the nudge that its director metadata moved.

One reader for every way a device learns of it (the stream, the unary call and the broker
notice), so they can never disagree.
"""

from __future__ import annotations

from sqlmodel import Session

from edgefleet.controlplane.store import devices
from edgefleet.protos.fleet.v1 import common_pb2, device_pb2


def desired_states(session: Session, device_ids: list[str]) -> dict[str, device_pb2.DesiredState]:
    """The nudge for each listed device's current generation, read in one query per
    ``devices.ID_CHUNK`` devices; generation 0 before its first assignment (nothing to send).
    A device revoked or removed is missing: its stream ends.

    A device whose last model was undeployed holds none, yet its generation moved: it still
    gets the nudge (without a bundle), or it would keep serving what it no longer may.
    ``bundle`` names the most recently deployed model, a hint only: the agent installs what
    the signed director targets list.
    """
    states: dict[str, device_pb2.DesiredState] = {}
    for device_id, row in devices.desired_rows(session, device_ids).items():
        if row.revoked:
            continue
        state = device_pb2.DesiredState(generation=max(row.generation, 0))
        if row.generation > 0 and row.bundle_name is not None and row.bundle_version is not None:
            state.bundle.CopyFrom(common_pb2.BundleRef(name=row.bundle_name, version=row.bundle_version))
        states[device_id] = state
    return states
