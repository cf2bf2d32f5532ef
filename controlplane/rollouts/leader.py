"""Which control-plane replica drives rollouts: exactly one at a time.

On PostgreSQL the leader holds a session-level advisory lock (``pg_try_advisory_lock``) on a
connection of its own, kept for as long as it leads; every tick a replica that does not lead
tries to take it, and the leader checks its connection is alive. The lock belongs to that
database session, so when the connection dies (network cut, the process killed, the server
restarted) PostgreSQL releases it and another replica takes over on its next tick; the replica
that lost it notices on its next check and stops acting. Between two replicas, the rollout
row lock each step takes (controlplane/rollouts/engine.py) and the rule that a device with a
generation from a rollout is never assigned again keep even an overlap of leaders harmless.

On SQLite one control plane is assumed (a file database is not shared between hosts): it
always leads.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Protocol

from sqlalchemy import text
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import SQLAlchemyError

log = logging.getLogger(__name__)

# Any constant works; it only has to be the same in every control plane, and differ from the
# migration lock's (controlplane/store/migrate.py).
ROLLOUT_LOCK_KEY = 0x65646765726F6C6C  # "edgeroll"


class Leadership(Protocol):
    async def hold(self) -> bool:
        """Whether this replica leads now (taking the lead when it is free)."""
        ...

    async def release(self) -> None:
        """Gives the lead up (at shutdown), so another replica takes it at once."""
        ...


class SingleInstance:
    """SQLite: the one control plane always leads."""

    async def hold(self) -> bool:
        return True

    async def release(self) -> None:
        return None


class PostgresLeadership:
    """The session-level advisory lock on a dedicated autocommit connection."""

    def __init__(self, engine: Engine, key: int = ROLLOUT_LOCK_KEY) -> None:
        self.engine = engine
        self.key = key
        self._conn: Connection | None = None
        self.leading = False

    async def hold(self) -> bool:
        return await asyncio.to_thread(self._hold)

    async def release(self) -> None:
        await asyncio.to_thread(self._release)

    def _hold(self) -> bool:
        try:
            if self._conn is None:
                # Autocommit: the connection never sits "idle in transaction" while it leads.
                self._conn = self.engine.connect().execution_options(isolation_level="AUTOCOMMIT")
            if self.leading:
                self._conn.execute(text("SELECT 1"))
                return True
            taken = self._conn.execute(text("SELECT pg_try_advisory_lock(:key)"), {"key": self.key}).scalar()
            if taken:
                log.info("this replica now drives rollouts (advisory lock %#x)", self.key)
            self.leading = bool(taken)
        except SQLAlchemyError as exc:
            if self.leading:
                log.warning("lost the rollout lead: its connection failed (%s)", exc)
            self._drop()
        return self.leading

    def _drop(self) -> None:
        self.leading = False
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(SQLAlchemyError):
                conn.invalidate()
                conn.close()

    def _release(self) -> None:
        if self._conn is not None and self.leading:
            with contextlib.suppress(SQLAlchemyError):
                self._conn.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": self.key})
        self.leading = False
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(SQLAlchemyError):
                conn.close()


def leadership_for(engine: Engine) -> Leadership:
    """The advisory lock on PostgreSQL; on anything else a single instance is assumed."""
    if engine.dialect.name == "postgresql":
        return PostgresLeadership(engine)
    return SingleInstance()
