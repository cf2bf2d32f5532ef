"""Periodic upkeep of a running control plane: the jobs that keep what it signs and stores fresh.

Runs on the server's event loop as one task for the life of the process (``app.server`` starts
and cancels it); the database work runs in worker threads.
"""

from __future__ import annotations

import asyncio
import functools
import logging

from edgefleet.controlplane.store.database import Database
from edgefleet.controlplane.telemetry.retention import RetentionPolicy, apply_retention
from edgefleet.controlplane.trust.repositories import Repositories
from edgefleet.controlplane.trust.revocation import Revocations

log = logging.getLogger(__name__)


class RefreshIncomplete(Exception):
    """Some repositories' metadata could not be re-signed this pass (each one logged)."""


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
        # One small transaction per repository, each under that repository's lock
        # (Repositories.refresh_one): replicas re-signing at once wait for each other and the
        # second finds nothing left to do; one failure skips one repository, not the batch.
        refreshed = failed = 0
        for device_id in await db.run(repositories.expiring):
            try:
                if await db.run(functools.partial(repositories.refresh_one, device_id=device_id)):
                    refreshed += 1
            except Exception:
                failed += 1
                log.exception(
                    "could not re-sign %s; the next pass retries", device_id or "the image repository"
                )
        if refreshed:
            log.info("re-signed %d repositories' expiring metadata", refreshed)
        if failed:
            raise RefreshIncomplete(f"{failed} repositories were not re-signed")

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
