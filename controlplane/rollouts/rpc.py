"""The rollout RPCs of OperatorService (CreateRollout, GetRollout, ListRollouts, ControlRollout):
authorization, the transaction, and each typed error mapped to its status code. The servicer
delegates here, so controlplane/services/operator_service.py stays about everything else.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import NoReturn, TypeVar

import grpc
from sqlmodel import Session

from controlplane.db import crud
from controlplane.db.database import Database
from controlplane.notifier import DesiredStateNotifier
from controlplane.rbac import OperatorIdentity, Role, authorize
from controlplane.repositories import RepositoryRefusal
from controlplane.rollouts import commands, convert, store
from controlplane.rollouts.engine import RolloutMachine
from controlplane.services.auth import Context
from protos.fleet.v1 import operator_pb2

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
            await context.abort(status_code(exc), str(exc))

    async def create(
        self, request: operator_pb2.CreateRolloutRequest, context: Context
    ) -> operator_pb2.Rollout:
        who = await authorize(self.db, context, Role.OPERATOR)
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
        return await self._read(context, lambda s: commands.describe(s, commands.lookup(s, request)))

    async def list(
        self, request: operator_pb2.ListRolloutsRequest, context: Context
    ) -> operator_pb2.ListRolloutsResponse:
        await authorize(self.db, context, Role.VIEWER)
        return await self._read(context, commands.describe_all)

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
        return described
