"""The rollout RPCs of OperatorService (CreateRollout, GetRollout, ListRollouts, ControlRollout):
authorization, the transaction, and each typed error mapped to its status code. The servicer
delegates here, so controlplane/api/operator_service.py stays about everything else.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Awaitable, Callable
from typing import NoReturn, TypeVar

import grpc
from sqlmodel import Session, col, select

from edgefleet.controlplane.api import pages
from edgefleet.controlplane.api.auth import Context
from edgefleet.controlplane.api.limits import MAX_NAME_CHARS
from edgefleet.controlplane.api.refusals import Refused
from edgefleet.controlplane.fleet.notifier import DesiredStateNotifier
from edgefleet.controlplane.fleet.rbac import OperatorIdentity, Role, authorize
from edgefleet.controlplane.rollouts import commands, convert, store
from edgefleet.controlplane.rollouts.engine import RolloutMachine
from edgefleet.controlplane.store import crud
from edgefleet.controlplane.store.database import Database
from edgefleet.controlplane.store.models import Bundle, Rollout
from edgefleet.controlplane.trust.repositories import RepositoryRefusal
from edgefleet.protos.fleet.v1 import operator_pb2

T = TypeVar("T")
Refuse = Callable[[Context, OperatorIdentity, str, str, grpc.StatusCode, str], Awaitable[NoReturn]]

# Each refusal's status code; the first class in the error's MRO that is listed wins.
ERROR_CODES: dict[type[Exception], grpc.StatusCode] = {
    convert.InvalidRollout: grpc.StatusCode.INVALID_ARGUMENT,
    commands.RolloutExists: grpc.StatusCode.ALREADY_EXISTS,
    commands.RolloutConflict: grpc.StatusCode.FAILED_PRECONDITION,
    commands.ImpossibleTransition: grpc.StatusCode.FAILED_PRECONDITION,
    store.RolloutNotFound: grpc.StatusCode.NOT_FOUND,
    crud.BundleNotFound: grpc.StatusCode.NOT_FOUND,
    RepositoryRefusal: grpc.StatusCode.FAILED_PRECONDITION,
}
REFUSALS = tuple(ERROR_CODES)
ROLLOUTS = pages.PageSpec("ListRollouts", default_size=100, max_size=1000)
MAX_LISTED_DEVICES = 10_000  # GetRollout's per-device detail; Rollout.devices_omitted counts the rest


def status_code(exc: Exception) -> grpc.StatusCode:
    return next(ERROR_CODES[k] for k in type(exc).__mro__ if k in ERROR_CODES)


def _target(ref: operator_pb2.GetRolloutRequest) -> str:
    return ref.name if ref.WhichOneof("rollout") == "name" else f"id:{ref.id}"


class RolloutRpcs:
    def __init__(
        self, *, db: Database, notifier: DesiredStateNotifier, machine: RolloutMachine, refuse: Refuse
    ) -> None:
        self.db = db
        self.notifier = notifier
        self.machine = machine
        self.refuse = refuse  # audits the refusal, then aborts the call

    async def _change(
        self, context: Context, who: OperatorIdentity, action: str, target: str, work: Callable[[Session], T]
    ) -> T:
        """Runs an operator's change; a refusal is audited and fails the call with its code."""
        try:
            return await self.db.run(work)
        except REFUSALS as exc:
            await self.refuse(context, who, action, target, status_code(exc), str(exc))

    async def _read(self, context: Context, work: Callable[[Session], T]) -> T:
        try:
            return await self.db.run(work)
        except REFUSALS as exc:
            raise Refused(status_code(exc), str(exc), action="rollout.read") from exc

    async def create(
        self, request: operator_pb2.CreateRolloutRequest, context: Context
    ) -> operator_pb2.Rollout:
        who = await authorize(self.db, context, Role.OPERATOR)
        if len(request.name) > MAX_NAME_CHARS:
            await self.refuse(
                context,
                who,
                "rollout.create",
                request.name,
                grpc.StatusCode.INVALID_ARGUMENT,
                f"a rollout name has at most {MAX_NAME_CHARS} characters",
            )
        try:
            spec = convert.spec(request)
        except convert.InvalidRollout as exc:
            await self.refuse(
                context, who, "rollout.create", request.name, grpc.StatusCode.INVALID_ARGUMENT, str(exc)
            )
        return await self._change(
            context,
            who,
            "rollout.create",
            request.name,
            lambda s: commands.describe(s, commands.create(s, spec, actor=who.actor)),
        )

    async def get(self, request: operator_pb2.GetRolloutRequest, context: Context) -> operator_pb2.Rollout:
        await authorize(self.db, context, Role.VIEWER)
        described = await self._read(context, lambda s: commands.describe(s, commands.lookup(s, request)))
        return bounded_devices(described)

    async def list(
        self, request: operator_pb2.ListRolloutsRequest, context: Context
    ) -> operator_pb2.ListRolloutsResponse:
        """A page of rollouts, oldest first, with per-wave counts but no per-device detail."""
        await authorize(self.db, context, Role.VIEWER)
        size = ROLLOUTS.size(request.page_size)
        after = pages.int_key(pages.decode_token(ROLLOUTS, request.page_token, {}))
        page = await self._read(context, lambda s: _rollouts_page(s, after=after, size=size))
        return operator_pb2.ListRolloutsResponse(rollouts=page.items, next_page_token=page.next_page_token)

    async def control(
        self, request: operator_pb2.ControlRolloutRequest, context: Context
    ) -> operator_pb2.Rollout:
        who = await authorize(self.db, context, Role.OPERATOR)
        verb = commands.TRANSITIONS.get(request.action)
        action = f"rollout.{verb.verb if verb else 'control'}"

        def control(session: Session) -> tuple[operator_pb2.Rollout, list[str]]:
            rollout, nudge = commands.control(
                session, self.machine, ref=request.rollout, action=request.action, actor=who.actor
            )
            return commands.describe(session, rollout), nudge

        described, nudge = await self._change(context, who, action, _target(request.rollout), control)
        self.notifier.notify(nudge)
        return bounded_devices(described)


def bounded_devices(rollout: operator_pb2.Rollout) -> operator_pb2.Rollout:
    """The rollout with at most MAX_LISTED_DEVICES devices listed, so a rollout over a large
    fleet still fits in a reply; ``devices_omitted`` says how many more there are."""
    extra = len(rollout.devices) - MAX_LISTED_DEVICES
    if extra > 0:
        del rollout.devices[MAX_LISTED_DEVICES:]
        rollout.devices_omitted = extra
    return rollout


def _rollouts_page(session: Session, *, after: int | None, size: int) -> pages.Page[operator_pb2.Rollout]:
    query = select(Rollout)
    if after is not None:
        query = query.where(col(Rollout.id) > after)
    rollouts = session.exec(query.order_by(col(Rollout.id)).limit(size + 1)).all()
    counts = store.device_counts(session, [r.id for r in rollouts if r.id is not None])
    wanted = sorted({r.bundle_id for r in rollouts if r.bundle_id is not None})
    found = session.exec(select(Bundle).where(col(Bundle.id).in_(wanted))).all() if wanted else []
    bundles = {b.id: b for b in found if b.id is not None}

    def describe(rollout: Rollout) -> operator_pb2.Rollout:
        return convert.message(rollout, bundles=bundles, counts=counts.get(rollout.id or 0, Counter()))

    return pages.cut(ROLLOUTS, rollouts, size=size, encode=describe, key=lambda r: r.id or 0, filters={})
