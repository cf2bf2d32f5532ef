"""The health service's database probe: ``SELECT 1`` on a connection of its own.

A fresh connection per probe (no pool): a probe through the serving pool would wait behind
busy connections and report the pool's load, not whether the database answers, and a pooled
connection that died would answer for the first probe only. For the same reason the probe runs
on a thread of its own, not on the default executor the database work shares: during a burst
(a deploy to every device) it would queue behind stream reads and status reports, miss its
deadline and turn a healthy replica NOT_SERVING. Each probe is bounded: the connect timeout and
a statement timeout on the server, and a deadline on the waiting side too.
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor

from sqlalchemy import create_engine, text
from sqlalchemy.engine import Engine
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.pool import NullPool

log = logging.getLogger(__name__)


class SqlProbe:
    """``alive()`` is whether ``SELECT 1`` answered within ``timeout`` seconds."""

    def __init__(self, url: str, *, timeout: float) -> None:
        self.timeout = timeout
        self._engine = _probe_engine(url, timeout)
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="database-probe")

    async def alive(self) -> bool:
        probe = asyncio.get_running_loop().run_in_executor(self._thread, self._select_one)
        try:
            return await asyncio.wait_for(probe, self.timeout + 1.0)
        except TimeoutError:
            return False

    def _select_one(self) -> bool:
        try:
            with self._engine.connect() as conn:
                conn.execute(text("SELECT 1"))
        except SQLAlchemyError as exc:
            log.debug("database probe failed: %s", exc)
            return False
        return True

    def close(self) -> None:
        self._thread.shutdown(wait=False, cancel_futures=True)
        self._engine.dispose()


def _probe_engine(url: str, timeout: float) -> Engine:
    if url.startswith("sqlite"):
        return create_engine(url, poolclass=NullPool, connect_args={"timeout": timeout})
    seconds = max(2, int(timeout))  # libpq's smallest connect timeout
    return create_engine(
        url,
        poolclass=NullPool,
        connect_args={
            "connect_timeout": seconds,
            "options": f"-c statement_timeout={int(timeout * 1000)}",
        },
    )
