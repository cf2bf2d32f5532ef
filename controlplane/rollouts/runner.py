"""The rollout engine as the control plane runs it: an asyncio task that, every tick, makes
sure this replica leads (controlplane/rollouts/leader.py) and steps every rollout with work,
each in its own transaction, then nudges the devices it re-assigned.

Nothing lives in memory between ticks: a restarted control plane picks up each rollout from
its rows, and a failing rollout (logged) does not hold up the others.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from functools import partial

from edgefleet.controlplane.fleet.notifier import DesiredStateNotifier
from edgefleet.controlplane.rollouts import store
from edgefleet.controlplane.rollouts.engine import EngineConfig, RolloutMachine
from edgefleet.controlplane.rollouts.leader import Leadership, leadership_for
from edgefleet.controlplane.store.database import Database
from edgefleet.controlplane.store.models import utcnow
from edgefleet.controlplane.trust.repositories import Repositories

log = logging.getLogger(__name__)


class RolloutEngine:
    def __init__(
        self,
        *,
        db: Database,
        repositories: Repositories,
        notifier: DesiredStateNotifier,
        config: EngineConfig | None = None,
        leadership: Leadership | None = None,
    ) -> None:
        self.db = db
        self.notifier = notifier
        self.config = config or EngineConfig()
        self.machine = RolloutMachine(repositories, self.config)
        self.leadership = leadership or leadership_for(db.engine)
        self.leading = False
        self.steps = 0  # rollout steps taken while leading, for tests and metrics
        self._task: asyncio.Task[None] | None = None
        self._woken = asyncio.Event()

    def wake(self) -> None:
        """Steps the rollouts now instead of at the next tick: one was just created or
        controlled through this replica (a replica that does not lead steps nothing)."""
        self._woken.set()

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="rollout-engine")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        await self.leadership.release()
        self.leading = False

    async def tick(self) -> None:
        """One round: lead or stand by, then step every rollout that has work."""
        self.leading = await self.leadership.hold()
        if not self.leading:
            return
        for rollout_id in await self.db.run(store.rollouts_to_drive):
            try:
                nudge = await self.db.run(partial(self.machine.step, rollout_id=rollout_id, now=utcnow()))
            except Exception:
                log.exception("rollout %d: step failed; retrying next tick", rollout_id)
                continue
            self.steps += 1
            self.notifier.changed(nudge)

    async def _run(self) -> None:
        while True:
            self._woken.clear()  # a wake during the tick makes the next one start at once
            try:
                await self.tick()
            except Exception:
                log.exception("rollout engine tick failed; retrying in %.1fs", self.config.tick_seconds)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._woken.wait(), self.config.tick_seconds)
