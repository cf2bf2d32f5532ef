"""OperatorService's rollout RPCs (CreateRollout, GetRollout, ListRollouts, ControlRollout):
authorization, then one rollout command (``edgefleet.controlplane.rollouts.commands``) in one
transaction; its refusals are entries of the API's one table (``refusals``), named after the
change for operators' changes and ``rollout.read`` for reads.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import TypeVar

from sqlmodel import Session, col, select

from edgefleet.controlplane.api import pages
from edgefleet.controlplane.api.auth import Context, authorize
from edgefleet.controlplane.api.limits import MAX_NAME_CHARS
from edgefleet.controlplane.api.operator_parts import OperatorParts
from edgefleet.controlplane.api.refusals import InvalidRequest, refused
from edgefleet.controlplane.fleet.rbac import Role
from edgefleet.controlplane.rollouts import commands, convert, store
from edgefleet.controlplane.store.models import Bundle, Rollout
from edgefleet.protos.fleet.v1 import operator_pb2

T = TypeVar("T")
ROLLOUTS = pages.PageSpec("ListRollouts", default_size=100, max_size=1000)
MAX_LISTED_DEVICES = 10_000  # GetRollout's per-device detail; Rollout.devices_omitted counts the rest


def _target(ref: operator_pb2.GetRolloutRequest) -> str:
    return ref.name if ref.WhichOneof("rollout") == "name" else f"id:{ref.id}"


class RolloutRpcs(OperatorParts):
    async def _read(self, work: Callable[[Session], T]) -> T:
        """A read: its refusal (an unknown rollout, say) is named rollout.read."""
        return await self.command(work, action="rollout.read", target="")

    async def CreateRollout(
        self, request: operator_pb2.CreateRolloutRequest, context: Context
    ) -> operator_pb2.Rollout:
        who = await authorize(self.db, context, Role.OPERATOR)
        if len(request.name) > MAX_NAME_CHARS:
            raise InvalidRequest(
                f"a rollout name has at most {MAX_NAME_CHARS} characters",
                action="rollout.create",
                target=request.name,
            )
        try:
            spec = convert.spec(request)
        except convert.InvalidRollout as exc:
            raise refused(exc, action="rollout.create", target=request.name) from exc
        created = await self.command(
            lambda s: commands.describe(s, commands.create(s, spec, actor=who.actor)),
            action="rollout.create",
            target=request.name,
        )
        if self.wake_rollouts is not None:
            self.wake_rollouts()  # its first wave starts now, not at the engine's next tick
        return created

    async def GetRollout(
        self, request: operator_pb2.GetRolloutRequest, context: Context
    ) -> operator_pb2.Rollout:
        await authorize(self.db, context, Role.VIEWER)
        described = await self._read(lambda s: commands.describe(s, commands.lookup(s, request)))
        return bounded_devices(described)

    async def ListRollouts(
        self, request: operator_pb2.ListRolloutsRequest, context: Context
    ) -> operator_pb2.ListRolloutsResponse:
        """A page of rollouts, oldest first, with per-wave counts but no per-device detail."""
        await authorize(self.db, context, Role.VIEWER)
        size = ROLLOUTS.size(request.page_size)
        after = pages.int_key(pages.decode_token(ROLLOUTS, request.page_token, {}))
        page = await self._read(lambda s: _rollouts_page(s, after=after, size=size))
        return operator_pb2.ListRolloutsResponse(rollouts=page.items, next_page_token=page.next_page_token)

    async def ControlRollout(
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

        described, nudge = await self.command(control, action=action, target=_target(request.rollout))
        self.notifier.changed(nudge)
        if self.wake_rollouts is not None:
            self.wake_rollouts()  # a resumed or advanced rollout moves now
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
