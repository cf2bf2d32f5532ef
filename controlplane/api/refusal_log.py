"""Audits refusals of callers that may repeat them without bound, in bounded space.

A stranger trying bootstrap tokens, or a broken device retrying a refused call, would
otherwise add one audit entry per attempt. Refusals are grouped by (peer, action, reason kind)
in windows of ``window_seconds``: the first refusal of a group in a window is audited at once,
with its reason; later ones are only counted, and when the window closes one summary entry
records how many there were and when. The audit chain is append-only, so a summary is a new
entry, never an update of the first.

Space is bounded too: at most ``max_groups`` groups are open (opening one more closes the
oldest, writing its summary), and at most ``max_first_entries`` first entries are written per
window across all groups; past that, new groups fold into one group per (action, reason kind)
whose peer is "*", so a flood from many addresses still writes a bounded number of entries.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from edgefleet.controlplane.fleet.audit import Outcome

ANY_PEER = "*"


@dataclass(frozen=True, slots=True)
class AuditRow:
    """Keyword arguments of edgefleet.controlplane.fleet.audit.record for one entry."""

    actor: str
    action: str
    target: str
    outcome: str
    detail: dict[str, Any]


Write = Callable[[list[AuditRow]], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class RefusalKey:
    peer: str
    action: str
    kind: str  # the refusal's class, never its text: the text may be caller-supplied


@dataclass(slots=True)
class _Group:
    opened: float
    actor: str
    target: str
    first: datetime
    last: datetime = field(default_factory=lambda: datetime.now(UTC))
    repeats: int = 0


class RefusalLog:
    def __init__(
        self,
        write: Write,
        *,
        window_seconds: float = 60.0,
        max_groups: int = 4096,
        max_first_entries: int = 256,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._write = write
        self.window_seconds = window_seconds
        self.max_groups = max_groups
        self.max_first_entries = max_first_entries
        self._clock = clock
        self._groups: OrderedDict[RefusalKey, _Group] = OrderedDict()
        self._window_opened = clock()
        self._firsts_in_window = 0
        self._closer: asyncio.Task[None] | None = None

    async def refused(
        self, *, peer: str, actor: str, action: str, target: str, kind: str, reason: str
    ) -> None:
        """Records one refusal: an entry now if it opens a group, else a count for the summary."""
        now = self._clock()
        await self.close_windows(now)
        key = RefusalKey(peer, action, kind)
        group = self._groups.get(key)
        if group is None and self._firsts_in_window >= self.max_first_entries:
            key = RefusalKey(ANY_PEER, action, kind)
            group = self._groups.get(key)
        moment = datetime.now(UTC)
        if group is not None:
            group.repeats += 1
            group.last = moment
            self._start_closer()
            return
        closed: list[AuditRow] = []
        while len(self._groups) >= self.max_groups:
            old_key, old = self._groups.popitem(last=False)
            closed.extend(self._summary(old_key, old))
        self._groups[key] = _Group(opened=now, actor=actor, target=target, first=moment, last=moment)
        self._firsts_in_window += 1
        detail = {"peer": key.peer, "reason": reason, "kind": kind}
        await self._write([*closed, AuditRow(actor, action, target, Outcome.REFUSED, detail)])

    def _summary(self, key: RefusalKey, group: _Group) -> list[AuditRow]:
        if not group.repeats:
            return []
        detail = {
            "peer": key.peer,
            "kind": key.kind,
            "repeats": group.repeats,
            "first": group.first.isoformat(),
            "last": group.last.isoformat(),
            "window_seconds": self.window_seconds,
        }
        target = f"peer:{key.peer}" if key.peer == ANY_PEER else group.target
        return [AuditRow(group.actor, key.action, target, Outcome.REFUSED, detail)]

    async def close_windows(self, now: float | None = None) -> None:
        """Writes the summary of every group whose window has closed, and forgets the group."""
        now = self._clock() if now is None else now
        if now - self._window_opened >= self.window_seconds:
            self._window_opened, self._firsts_in_window = now, 0
        closed: list[AuditRow] = []
        for key in [k for k, g in self._groups.items() if now - g.opened >= self.window_seconds]:
            closed.extend(self._summary(key, self._groups.pop(key)))
        if closed:
            await self._write(closed)

    def _start_closer(self) -> None:
        """Summaries must land even when the refused caller goes quiet: one task sleeps until
        the oldest group's window closes, writes, and ends once no group is open."""
        if self._closer is None or self._closer.done():
            self._closer = asyncio.get_running_loop().create_task(self._close_when_due())

    async def _close_when_due(self) -> None:
        while self._groups:
            oldest = min(g.opened for g in self._groups.values())
            await asyncio.sleep(max(0.0, oldest + self.window_seconds - self._clock()))
            await self.close_windows()

    async def aclose(self) -> None:
        """Writes every open group's summary now (at shutdown)."""
        if self._closer is not None:
            self._closer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._closer
        closed = [row for key, group in self._groups.items() for row in self._summary(key, group)]
        self._groups.clear()
        if closed:
            await self._write(closed)

    def __len__(self) -> int:
        return len(self._groups)
