"""Periodic upkeep of a running control plane: the jobs that keep what it signs and stores fresh.

Runs on the server's event loop as one task for the life of the process (``app.server`` starts
and cancels it); the database work runs in worker threads.
"""

from __future__ import annotations

import asyncio
import logging

from edgefleet.controlplane.store.database import Database
from edgefleet.controlplane.telemetry.retention import RetentionPolicy, apply_retention
from edgefleet.controlplane.trust.repositories import Repositories
from edgefleet.controlplane.trust.revocation import Revocations

log = logging.getLogger(__name__)


async def upkeep(
    db: Database,
    repositories: Repositories,
    revocations: Revocations,
    retention: RetentionPolicy,
    every: float,
) -> None:
    """Re-signs timestamps and director metadata before they expire, so online devices never
    see a freeze that is only the control plane's own neglect; re-issues the CRL likewise;
    folds telemetry past its retention into hourly rollups. Each job is tried on its own: one
    that fails (logged) never keeps the others from running, and is retried ``every`` seconds.
    Runs until cancelled."""

    async def refresh() -> None:
        refreshed = await db.run(repositories.refresh_expiring)
        if refreshed:
            log.info("re-signed %d repositories' expiring metadata", refreshed)

    async def crl() -> None:
        if revocations.crl_is_stale():
            await revocations.publish_crl()

    async def retain() -> None:
        result = await asyncio.to_thread(apply_retention, db.engine, retention)
        if result.failed:  # apply_retention logged each; its other steps ran
            log.warning("telemetry retention: %s failed this pass", ", ".join(result.failed))

    while True:
        for name, job in (
            ("metadata refresh", refresh),
            ("CRL re-issue", crl),
            ("telemetry retention", retain),
        ):
            try:
                await job()
            except Exception:
                log.exception("upkeep: %s failed; retrying in %.0fs", name, every)
        await asyncio.sleep(every)
