"""Carries desired-state changes to the streams of every replica, and the slow safety net.

With PostgreSQL every change that moves a device's desired state commits a notice on
``CHANGES_CHANNEL`` in its own transaction (``store.devices.announce_changes``). Each replica
holds one LISTEN connection here and wakes the streams of the devices connected to it; a
revocation notice wakes the stream, which re-reads the device, finds it revoked and ends.
Payloads: ``g:<id>,...`` (changed), ``r:<id>,...`` (revoked), ``*`` (too many to list: re-check
every stream here with one query).

Notices sent while the connection is down are lost, so after every (re)connect the replica
re-checks all its connected streams once. Besides, a jittered periodic re-check (the safety
net) costs the database one query per replica per interval for all its streams, so an idle
device costs nothing of its own. With SQLite (one node) the in-process notifier wakes streams
and only the safety net runs here.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import AsyncIterator, Awaitable, Callable

import psycopg
import psycopg.conninfo
from psycopg import sql
from sqlalchemy.exc import SQLAlchemyError
from tenacity import AsyncRetrying, retry_if_exception_type, wait_random_exponential

from edgefleet.controlplane.fleet.notifier import DesiredStateNotifier
from edgefleet.controlplane.store import devices
from edgefleet.controlplane.store.database import Database

log = logging.getLogger(__name__)

JITTER = 0.2  # the safety net's interval varies ±20 %, so replicas do not query in step
MAX_IDS_PER_QUERY = 5000  # one IN list stays a reasonable statement on either database
FIRST_LISTEN_TIMEOUT_S = 10.0  # start-up waits this long for the first LISTEN, then goes on
RECONNECT_MAX_WAIT_S = 30.0


def parse_notice(payload: str) -> tuple[str, list[str]]:
    """(kind, device ids) of a notice; anything unreadable counts as ``*`` (re-check all)."""
    kind, sep, ids = payload.partition(":")
    if sep and kind in (devices.NOTICE_CHANGED, devices.NOTICE_REVOKED) and ids:
        return kind, ids.split(",")
    return devices.NOTICE_ALL, []


async def recheck(db: Database, notifier: DesiredStateNotifier) -> int:
    """Wakes every connected stream that is behind the database (or revoked), reading all
    their generations in one read-only query (per MAX_IDS_PER_QUERY streams: on SQLite it
    takes no write lock); returns how many woke. The woken streams read their states
    together again (``DeviceService.desired``)."""
    connected = notifier.connected()
    woken = 0
    for start in range(0, len(connected), MAX_IDS_PER_QUERY):
        batch = connected[start : start + MAX_IDS_PER_QUERY]
        generations = await db.read(lambda s, batch=batch: devices.desired_generations(s, batch))  # type: ignore[misc]
        behind = notifier.stale({d: generations.get(d) for d in batch})
        notifier.notify(behind)
        woken += len(behind)
    return woken


class ChangeFeed:
    """The replica's LISTEN connection (PostgreSQL only) and its periodic re-check."""

    def __init__(self, db: Database, notifier: DesiredStateNotifier, *, interval: float) -> None:
        self.db = db
        self.notifier = notifier
        self.interval = interval
        self.connects = 0  # LISTEN connections made so far (1 + reconnects)
        self.backend_pid: int | None = None  # the LISTEN connection's server process
        self.listening = asyncio.Event()
        self._due = asyncio.Event()  # a re-check of every stream is wanted now
        self._random = random.Random()
        self._on_revoked: list[Callable[[list[str]], None]] = []

    def on_revoked(self, hook: Callable[[list[str]], None]) -> None:
        """Calls ``hook`` with the device ids of every revocation notice this replica hears
        (any replica's, its own included): e.g. to rewrite the local CRL file. After every
        (re)connect it is called with no ids: notices may have been lost, re-read everything.
        It runs on the event loop and must not block."""
        self._on_revoked.append(hook)

    @property
    def postgres(self) -> bool:
        return self.db.engine.dialect.name == "postgresql"

    def _conninfo(self) -> str:
        """libpq's form of the engine's URL, with TCP keepalives: a silently dead connection
        (cable cut, no RST) is noticed within about a minute."""
        url = self.db.engine.url.set(drivername="postgresql").render_as_string(hide_password=False)
        return psycopg.conninfo.make_conninfo(
            url, keepalives=1, keepalives_idle=30, keepalives_interval=10, keepalives_count=3
        )

    def deliver(self, payload: str) -> None:
        """Acts on one notice: wakes the named devices' streams, or asks for a full re-check."""
        kind, ids = parse_notice(payload)
        if kind == devices.NOTICE_ALL:
            self._due.set()
            return
        self.notifier.notify(ids)
        if kind == devices.NOTICE_REVOKED:
            self._revoked(ids)

    def _revoked(self, ids: list[str]) -> None:
        for hook in self._on_revoked:
            try:
                hook(ids)
            except Exception:
                log.exception("a revocation hook failed")

    async def safety_net(self) -> None:
        """Re-checks all streams every interval (± JITTER), or at once when asked to."""
        while True:
            wait = self.interval * self._random.uniform(1 - JITTER, 1 + JITTER)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._due.wait(), wait)
            self._due.clear()
            try:
                await recheck(self.db, self.notifier)
            except SQLAlchemyError:
                log.warning("desired-state re-check failed; trying again next interval", exc_info=True)

    async def listen(self) -> None:
        """Holds the LISTEN connection; reconnects (backing off with jitter) whenever it drops,
        and after each connect re-checks every stream, for notices sent meanwhile are lost."""
        while True:
            conn = await self._connect()
            try:
                async with conn:
                    self.connects += 1
                    self.backend_pid = conn.info.backend_pid
                    self.listening.set()
                    self._due.set()
                    self._revoked([])
                    async for notice in conn.notifies():
                        self.deliver(notice.payload)
            except psycopg.OperationalError as exc:
                log.warning("lost the desired-state LISTEN connection (%s); reconnecting", exc)
            finally:
                self.listening.clear()

    async def _connect(self) -> psycopg.AsyncConnection[tuple[object, ...]]:
        async for attempt in AsyncRetrying(
            wait=wait_random_exponential(multiplier=0.2, max=RECONNECT_MAX_WAIT_S),
            retry=retry_if_exception_type(psycopg.OperationalError),
            before_sleep=lambda state: log.warning(
                "cannot LISTEN for desired-state changes (attempt %d); retrying", state.attempt_number
            ),
        ):
            with attempt:
                conn = await psycopg.AsyncConnection.connect(self._conninfo(), autocommit=True)
                try:
                    await conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(devices.CHANGES_CHANNEL)))
                except BaseException:
                    await conn.close()
                    raise
                return conn
        raise AssertionError("unreachable: AsyncRetrying retries until it connects")


async def _run(name: str, work: Callable[[], Awaitable[None]]) -> None:
    try:
        await work()
    except asyncio.CancelledError:
        raise
    except Exception:
        log.exception("%s stopped", name)
        raise


@contextlib.asynccontextmanager
async def change_feed(
    db: Database, notifier: DesiredStateNotifier, *, interval: float
) -> AsyncIterator[ChangeFeed]:
    """Runs the feed for the ``async with`` block. With PostgreSQL it waits (at most
    FIRST_LISTEN_TIMEOUT_S) until the LISTEN connection stands, so changes committed after
    start-up reach this replica; without it yet, the re-check after its connect catches up."""
    feed = ChangeFeed(db, notifier, interval=interval)
    tasks = [asyncio.create_task(_run("desired-state safety net", feed.safety_net))]
    if feed.postgres:
        tasks.append(asyncio.create_task(_run("desired-state listener", feed.listen)))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(feed.listening.wait(), FIRST_LISTEN_TIMEOUT_S)
    try:
        yield feed
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
