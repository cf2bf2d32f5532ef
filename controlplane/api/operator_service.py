"""OperatorService: the operator's API, composed of one mixin per RPC family.

- ``bundles``: PushBundle, ListBundles, GetImageTargets, PublishImageTargets;
- ``fleet``: ListDevices, Deploy, Undeploy, SetVariantPin, SetDeviceLabels, RevokeDevice;
- ``access``: CreateToken, CreateOperator, ListOperators, RevokeOperator, PushRoot, ListAudit,
  VerifyAudit;
- ``telemetry``: QueryTelemetry, TailTelemetry;
- ``rollouts``: CreateRollout, GetRollout, ListRollouts, ControlRollout.

Why mixins rather than delegation: gRPC registers one servicer object and finds each RPC as a
method of its generated base class; with mixins every family module defines its RPCs once,
under their real names and signatures, and the guard (``guard.guarded``) wraps the composed
class's methods in one place, with no forwarding method per RPC that could drift from the one
it forwards to. The families share only the dependencies set here (``OperatorParts``).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from edgefleet.controlplane.api.access import AccessRpcs
from edgefleet.controlplane.api.bundles import BundleRpcs
from edgefleet.controlplane.api.fleet import FleetRpcs
from edgefleet.controlplane.api.guard import CallGuard, guarded
from edgefleet.controlplane.api.ratelimit import RateLimit
from edgefleet.controlplane.api.rollouts import RolloutRpcs
from edgefleet.controlplane.api.telemetry import TelemetryRpcs
from edgefleet.controlplane.fleet.notifier import DesiredStateNotifier
from edgefleet.controlplane.rollouts.engine import EngineConfig, RolloutMachine
from edgefleet.controlplane.store.blobs import BlobStore
from edgefleet.controlplane.store.database import Database
from edgefleet.controlplane.trust.repositories import Repositories
from edgefleet.protos.fleet.v1 import operator_pb2, operator_pb2_grpc


@guarded(operator_pb2.DESCRIPTOR.services_by_name["OperatorService"])
class OperatorService(
    BundleRpcs,
    FleetRpcs,
    AccessRpcs,
    TelemetryRpcs,
    RolloutRpcs,
    operator_pb2_grpc.OperatorServiceServicer,
):
    def __init__(
        self,
        *,
        db: Database,
        blobs: BlobStore,
        notifier: DesiredStateNotifier,
        repositories: Repositories,
        on_device_revoked: Callable[[str], Awaitable[None]] | None = None,
        rollout_config: EngineConfig | None = None,
        rate_limit: RateLimit | None = None,
        wake_rollouts: Callable[[], None] | None = None,
    ) -> None:
        self.guard = CallGuard(db=db, rate_limit=rate_limit)
        self.db = db
        self.blobs = blobs
        self.notifier = notifier
        self.repositories = repositories
        self.on_device_revoked = on_device_revoked  # e.g. re-issue the CRL and cut the broker session
        self.wake_rollouts = wake_rollouts  # the rollout engine steps now, not at its next tick
        self.machine = RolloutMachine(repositories, rollout_config or EngineConfig())
