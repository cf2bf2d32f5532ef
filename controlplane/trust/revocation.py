"""What revoking a device does beyond the database row: the broker must stop trusting it too.

* The CRL file (Mosquitto's ``crlfile``) is re-issued at once, so the broker refuses the
  device's certificate on its next TLS handshake once it re-reads the file (SIGHUP; the
  systemd path unit in ``deploy/`` sends it when the file changes). The embedded broker reads
  the same file again on the next device connection after it changed (``crl.CrlFile``). It is
  also re-issued daily, long before it expires: an expired CRL makes either broker refuse
  every device. It is written before the session is ended, so the reconnect that follows
  already meets the new list.
* The device's open MQTT connection is ended by session takeover: the control plane connects
  with the device's client id (on Mosquitto's device listener ``use_username_as_clientid``
  makes that the certificate's device id) and leaves; the broker closes the older connection.
  A second takeover a few seconds later catches a reconnect that beat the broker's reload.
* Telemetry still in flight is dropped at ingestion (``edgefleet.controlplane.store.telemetry``).
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import threading
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from sqlmodel import Session

from edgefleet.controlplane.store import devices as device_queries
from edgefleet.controlplane.store.database import Database
from edgefleet.controlplane.trust.ca import CertificateAuthority
from edgefleet.controlplane.trust.crl import CRL_VALIDITY, RevokedCertificate, build_crl, write_crl
from edgefleet.protos.fleet.broker_url import BrokerAddress, configure_client, parse_broker_url

log = logging.getLogger(__name__)

TAKEOVER_TIMEOUT_SECONDS = 5.0
SECOND_TAKEOVER_AFTER_SECONDS = 3.0


def end_broker_session(broker_url: str, client_id: str, tls_context: ssl.SSLContext | None = None) -> bool:
    """Connects with ``client_id`` (clean start, in the URL's MQTT version) and disconnects: the
    broker closes whichever connection held that id, and publishes its Last Will (the device's
    Presence offline, which ingestion ignores for a revoked device). Returns False when the
    broker could not be reached or refused us."""
    address = parse_broker_url(broker_url)
    client = _takeover_client(address, client_id)
    configure_client(client, address, tls_context)
    accepted = threading.Event()
    client.on_connect = lambda _c, _u, _f, reason, _p: accepted.set() if not reason.is_failure else None
    try:
        if address.v5:
            client.connect(address.host, address.port, keepalive=10, clean_start=True)
        else:
            client.connect(address.host, address.port, keepalive=10)
    except OSError as exc:
        log.warning("cannot reach %s to end %s's session: %s", address.url, client_id, exc)
        return False
    client.loop_start()
    try:
        return accepted.wait(TAKEOVER_TIMEOUT_SECONDS)
    finally:
        client.disconnect()
        client.loop_stop()


def _takeover_client(address: BrokerAddress, client_id: str) -> mqtt.Client:
    """A client that never reconnects: one CONNECT is the whole job."""
    if address.v5:
        return mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=address.protocol,
            reconnect_on_failure=False,
        )
    return mqtt.Client(
        CallbackAPIVersion.VERSION2,
        client_id=client_id,
        clean_session=True,
        protocol=address.protocol,
        reconnect_on_failure=False,
    )


@dataclass
class Revocations:
    """Carries a device revocation to the broker: CRL file and open session.

    CRL writes are serialised (read the revoked list and write the file under one lock), so
    two revocations in quick succession cannot leave the older list on disk; a write that
    failed marks the CRL stale, and the control plane's upkeep retries it.
    """

    db: Database
    ca: CertificateAuthority
    crl_path: Path
    broker_url: str
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)
    _lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    _unpublished: bool = False
    _published: frozenset[int] | None = None  # the serials the CRL file lists

    def _revoked(self, session: Session) -> list[RevokedCertificate]:
        entries = device_queries.revoked_certificates(session, now=datetime.now(UTC))
        return [RevokedCertificate(serial, when) for serial, when in entries]

    async def publish_crl(self) -> None:
        async with self._lock:
            self._unpublished = True
            revoked = await self.db.run(self._revoked)
            await asyncio.to_thread(write_crl, self.crl_path, self.ca, revoked)
            self._published = frozenset(entry.serial for entry in revoked)
            self._unpublished = False

    def current_crl(self) -> bytes:
        """The CRL as the database has it now, freshly signed (what ``GET /crl.pem`` serves):
        whichever replica revoked, every replica answers with the same list. Blocking."""
        return build_crl(self.ca, self.db.run_sync(self._revoked))

    def heard_revocation(self, device_ids: list[str]) -> None:
        """A replica (maybe this one) revoked ``device_ids`` (none: notices may have been lost):
        rewrites the CRL file from the database, in a task of its own, for this is called on the
        event loop by the change feed and must not block. A failure is logged; ``follow``
        catches up at its next check."""
        task = asyncio.create_task(self._republish())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _republish(self) -> None:
        try:
            await self.publish_crl()
        except Exception:
            log.exception("could not re-issue the CRL after a revocation notice; retrying on the timer")

    async def follow(self, every: float) -> None:
        """Rewrites the CRL file whenever the database's revoked serials differ from the ones
        it lists (a revocation made through another replica), checked every ``every``
        seconds with one query; runs until cancelled. A failed check is logged and retried."""
        while True:
            await asyncio.sleep(every)
            try:
                revoked = await self.db.run(self._revoked)
                if frozenset(entry.serial for entry in revoked) != self._published:
                    await self.publish_crl()
                    log.info("re-issued the CRL: the database lists other revocations")
            except Exception:
                log.exception("could not compare the CRL with the database; retrying in %.0fs", every)

    def crl_is_stale(self) -> bool:
        if self._unpublished:
            return True
        try:
            age = datetime.now(UTC).timestamp() - self.crl_path.stat().st_mtime
        except FileNotFoundError:
            return True
        return age > (CRL_VALIDITY / 7).total_seconds()

    async def device_revoked(self, device_id: str) -> None:
        """Re-issues the CRL, ends the device's broker session now and once more shortly after.

        The revocation is already committed: a failure here is logged and retried by upkeep
        (the CRL) or the second takeover (the session), never reported as a failed revoke.
        """
        try:
            await self.publish_crl()
        except Exception:
            log.exception("could not re-issue the CRL after revoking %s; upkeep retries", device_id)
        if await asyncio.to_thread(end_broker_session, self.broker_url, device_id):
            log.info("ended %s's broker session", device_id)
        task = asyncio.create_task(self._end_again(device_id))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _end_again(self, device_id: str) -> None:
        await asyncio.sleep(SECOND_TAKEOVER_AFTER_SECONDS)
        await asyncio.to_thread(end_broker_session, self.broker_url, device_id)

    def cancel(self) -> None:
        for task in self._tasks:
            task.cancel()
