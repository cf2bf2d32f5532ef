"""Retiring a control-plane replica for good without losing its share of the telemetry.

Each replica's persistent broker session is a member of the shared subscription, and Mosquitto
keeps routing a share of the stream to a member that is down, for as long as its session lives
(14 days). A replica taken out of service would take that share with it. Retiring resumes its
session under its own client id, leaves the share group at once (no new messages are routed
to it), stores what the session held, and ends the session, all with the ordinary ingestor.
"""

from __future__ import annotations

import logging
import ssl
import time
from dataclasses import dataclass

from sqlalchemy.engine import Engine

from edgefleet.controlplane.telemetry.ingest import TelemetryIngestor, replica_client_id
from edgefleet.controlplane.telemetry.ingest_health import IngestStats

logger = logging.getLogger(__name__)


class RetireError(RuntimeError):
    """The replica's session could not be drained and ended; it was kept."""


@dataclass(frozen=True, slots=True)
class Retired:
    """What retiring a replica stored from its session."""

    client_id: str
    stats: IngestStats


def retire_replica(
    engine: Engine,
    broker_url: str,
    replica: str,
    *,
    quiet_s: float = 5.0,
    connect_timeout_s: float = 30.0,
    tls_context: ssl.SSLContext | None = None,
) -> Retired:
    """Drains replica ``replica``'s session into the database and ends it. The session counts as
    drained once nothing has arrived for ``quiet_s`` seconds after leaving the group. The
    replica itself must not be running. Raises RetireError (session kept) when the broker does
    not answer or not everything received could be written; ValueError for a bad replica id
    or an MQTT 3.1.1 broker."""
    client_id = replica_client_id(replica)
    ingestor = TelemetryIngestor(
        engine=engine, broker_url=broker_url, client_id=client_id, tls_context=tls_context, retiring=True
    )
    ingestor.start()
    try:
        if not ingestor.wait_subscribed(connect_timeout_s):
            raise RetireError(f"the broker at {broker_url} did not take {client_id}'s session back")
        received, since = -1, time.monotonic()
        while time.monotonic() - since < quiet_s:
            if (now := ingestor.stats().received) != received:
                received, since = now, time.monotonic()
            time.sleep(min(0.2, quiet_s / 4))
    except BaseException:
        ingestor.stop()
        raise
    if not ingestor.stop(end_session=True):
        raise RetireError(f"not everything {client_id}'s session held could be stored; the session is kept")
    stats = ingestor.stats()
    logger.info("retired %s: %d telemetry messages (%d records) stored", client_id, stats.stored, stats.rows)
    return Retired(client_id=client_id, stats=stats)
