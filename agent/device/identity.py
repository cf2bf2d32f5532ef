"""The device's identity: obtained once by enrolling with a bootstrap token, then persisted.

What proves the identity is the key and certificate beside it (``edgefleet.agent.device.tls``); this
file records the id and where to reach the control plane and the broker.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from edgefleet.agent.device.channel import device_addresses
from edgefleet.protos.fleet.fsio import atomic_write_bytes


class IdentityError(Exception):
    """The identity file is unreadable or incomplete."""


@dataclass(frozen=True, slots=True)
class DeviceIdentity:
    device_id: str
    mqtt_url: str
    controlplane: str
    device_endpoint: str  # mutual-TLS address; ":PORT" means each control-plane host with that port

    @property
    def device_target(self) -> str:
        """The device endpoint's address(es) (``channel.device_addresses``): with a list of
        control-plane addresses and ``:PORT``, every host in it with that port, never one of
        their enrollment ports."""
        return device_addresses(self.controlplane, self.device_endpoint)


def load_identity(path: Path) -> DeviceIdentity | None:
    """The persisted identity, or None before the first enrollment."""
    try:
        raw = json.loads(path.read_bytes())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise IdentityError(f"identity file {path} is unreadable: {exc}") from exc
    try:
        return DeviceIdentity(**{f.name: str(raw[f.name]) for f in fields(DeviceIdentity)})
    except (KeyError, TypeError) as exc:
        raise IdentityError(f"identity file {path} is incomplete: {exc}") from exc


def save_identity(path: Path, identity: DeviceIdentity) -> None:
    atomic_write_bytes(path, json.dumps(asdict(identity), indent=2).encode(), mode=0o600)
