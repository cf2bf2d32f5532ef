"""What every family of OperatorService's RPCs works with, and the helpers they share.

OperatorService (``operator_service``) is composed of one mixin per RPC family (``bundles``,
``fleet``, ``access``, ``telemetry``, ``rollouts``); each is an ``OperatorParts`` so its
methods are typed against the dependencies the composed service sets once.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import TypeVar

from google.protobuf.timestamp_pb2 import Timestamp
from sqlmodel import Session

from edgefleet.controlplane.api.guard import CallGuard
from edgefleet.controlplane.api.refusals import run_command
from edgefleet.controlplane.fleet.notifier import DesiredStateNotifier
from edgefleet.controlplane.rollouts.engine import RolloutMachine
from edgefleet.controlplane.store.blobs import BlobStore
from edgefleet.controlplane.store.database import Database
from edgefleet.controlplane.store.values import as_utc
from edgefleet.controlplane.trust.repositories import Repositories

T = TypeVar("T")


def timestamp(value: datetime | None) -> Timestamp:
    """A stored time as a message field; unset (the epoch) for None."""
    ts = Timestamp()
    if value is not None:
        ts.FromDatetime(as_utc(value))
    return ts


class OperatorParts:
    """The dependencies of OperatorService's RPCs; ``OperatorService.__init__`` sets them."""

    guard: CallGuard
    db: Database
    blobs: BlobStore
    notifier: DesiredStateNotifier
    repositories: Repositories
    on_device_revoked: Callable[[str], Awaitable[None]] | None  # re-issue the CRL, cut the broker session
    machine: RolloutMachine
    wake_rollouts: Callable[[], None] | None  # the rollout engine steps now, not at its next tick

    async def command(self, work: Callable[[Session], T], *, action: str, target: str) -> T:
        """Runs one domain command in one transaction; its refusal fails the call named
        ``action``/``target`` and is audited (``refusals.run_command``)."""
        return await run_command(self.db, work, action=action, target=target)
