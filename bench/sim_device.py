"""One simulated device as the simulated fleet keeps it: what it received, reported and holds,
and how it answers a nudge (its ``Behaviour``).

Plain data and pure helpers, no I/O: bench.sim_fleet drives these over gRPC, bench.sim_telemetry
reads them to publish telemetry for them. Kept apart so a caller scripting behaviours (which
release fails where) needs nothing of the fleet's machinery.
"""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass, field

import grpc

from edgefleet.protos.fleet.v1 import common_pb2, device_pb2_grpc

ANY_RELEASE = "*"
"""In ``Behaviour.fail``: every release fails."""
VARIANT = "sim"
"""The variant every simulated device reports: it chose none, it holds no model."""
MAX_BACKOFF_S = 5.0


def release_name(name: str, version: int) -> str:
    """``name@version``, the way fleetctl names a release."""
    return f"{name}@{version}"


@dataclass(frozen=True, slots=True)
class Behaviour:
    """How a simulated device answers a nudge.

    ``fail`` lists releases (``name@version``, or ``ANY_RELEASE``) that fail to load on this
    device: it reports FAILED with ``error`` and ``error_kind`` and keeps its previous models.
    Per release, not per nudge, so a rollback to a release it could load succeeds. ``delay_s``
    is the time between VERIFYING and the outcome (a download and a smoke test, say).
    """

    delay_s: float = 0.0
    fail: frozenset[str] = frozenset()
    error: str = "the release failed its smoke test"
    error_kind: str = "SmokeTestFailed"

    @classmethod
    def failing(cls, *releases: str, delay_s: float = 0.0, error_kind: str = "SmokeTestFailed") -> Behaviour:
        """Fails ``releases`` (none given: every release)."""
        return cls(delay_s=delay_s, fail=frozenset(releases or (ANY_RELEASE,)), error_kind=error_kind)

    def fails(self, release: str | None) -> bool:
        return release is not None and (release in self.fail or ANY_RELEASE in self.fail)


@dataclass(slots=True, eq=False)
class SimDevice:
    """One simulated device: its channel and what it received, reported and holds.

    ``generation`` is the highest generation its stream delivered, ``received_at`` when
    (time.monotonic); ``reported`` the highest generation whose outcome (ACTIVE or FAILED)
    the control plane acknowledged. ``models`` maps bundle name to the version it serves.
    """

    device_id: str
    index: int
    channel: grpc.aio.Channel
    stub: device_pb2_grpc.DeviceServiceStub
    behaviour: Behaviour
    generation: int = 0
    received_at: float = 0.0
    reported: int = 0
    reported_at: float = 0.0
    state: int = common_pb2.DEVICE_STATE_IDLE
    models: dict[str, int] = field(default_factory=dict)
    active: str | None = None  # the latest release installed, "name@version"
    last_error: str = ""
    seq: int = 0  # telemetry sequence number, per device as the agent's outbox keeps it
    revoked: bool = False
    watch: asyncio.Task[None] | None = None
    applying: asyncio.Task[None] | None = None

    @property
    def api_url(self) -> str:
        """An address that names the device and can never resolve (RFC 2606 ``.invalid``)."""
        return f"http://{self.device_id}.sim.invalid:8080"

    def installed(self) -> list[common_pb2.InstalledModel]:
        return [
            common_pb2.InstalledModel(
                bundle=common_pb2.BundleRef(name=name, version=version), variant=VARIANT, loaded=True
            )
            for name, version in sorted(self.models.items())
        ]


def backoff(failures: int) -> float:
    """Jittered exponential backoff, so thousands of devices do not reconnect in lockstep."""
    return float(min(MAX_BACKOFF_S, 0.2 * 2 ** min(failures, 8)) * random.uniform(0.5, 1.0))
