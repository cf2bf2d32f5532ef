"""Telemetry ingestion: the MQTT subscriber and the ingestor's lifecycle.

The chain device outbox → broker → here → database is at-least-once end to end:
- the subscriptions live in a persistent broker session (a fixed client id per replica, MQTT v5
  clean_start=False with a Session Expiry Interval of ``session_expiry_s``), so QoS 1 messages
  published while this replica is down wait in the broker for it;
- a message is acknowledged to the broker (manual PUBACK) only after the batch holding it is
  committed (`batch_writer`), so a crash between receiving and writing makes the broker
  redeliver it;
- redeliveries are harmless because the database ignores a repeated (device_id, seq).

Replicas share the load with MQTT v5 shared subscriptions (``$share/controlplane/...``):
the broker hands each message to one member of the group, and each replica writes what it got.
Every replica needs its own client id (``replica_client_id``), or they would take over each
other's session, and that id must stay the same across restarts: Mosquitto keeps routing a
share of the messages to a replica that is down but whose session lives, and they wait there
until it comes back under the same id. A replica taken out of service for good is retired with
``fleetctl retire-replica`` (`retire`), which stores what its session holds and ends
it; otherwise its share waits there until the session expires and is then dropped. Mosquitto
2.0.11 does not restore shared subscriptions from its persistence file: after a broker restart nothing matches
until the replicas subscribe again, and the agents, told so by the v5 PUBACK (no matching
subscribers), keep those records in their outboxes meanwhile. On an MQTT 3.1.1 broker
(``?protocol=3.1.1``, the embedded demo broker) there are no shared subscriptions: one replica.
A lost connection is retried by paho with backoff; a reconnect that finds the session gone
(broker restarted without persistence, session expired, or taken over by another client with
our id) is counted (``sessions_lost``) and subscribes again.

Threads: paho's network thread runs the callbacks here and only queues what arrives into the
bounded `inbox` (flow control: when it is full the network thread waits, stops reading the
socket, and the backlog stays in the broker); the one writer thread (`batch_writer`) decodes
(`decode`), stores, dead-letters and acknowledges; counters and the stall and connection clocks
(`ingest_health`) are read from any thread. ``start``/``stop`` are called from one thread.
"""

from __future__ import annotations

import logging
import ssl
import threading
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions
from sqlalchemy.engine import Engine

from edgefleet.controlplane.telemetry.batch_writer import BatchWriter
from edgefleet.controlplane.telemetry.decode import MAX_MESSAGE_BYTES
from edgefleet.controlplane.telemetry.inbox import Inbound, Inbox
from edgefleet.controlplane.telemetry.ingest_health import IngestClock, IngestCounters, IngestStats
from edgefleet.protos.fleet.broker_url import BrokerAddress, configure_client, parse_broker_url
from edgefleet.protos.fleet.topics import (
    SHARED_GROUP,
    presence_subscription,
    shared,
    status_subscription,
    telemetry_subscription,
)

logger = logging.getLogger(__name__)

SESSION_EXPIRY_S = 14 * 24 * 3600  # as long as Mosquitto keeps a persistent session (deploy/)
CLIENT_ID_PREFIX = "edgefleet-controlplane-"


def replica_client_id(replica: str) -> str:
    """The MQTT client id of one control-plane replica: one persistent session each."""
    if not replica or not replica.isprintable() or any(c.isspace() for c in replica) or len(replica) > 200:
        raise ValueError(f"replica id {replica!r}: need 1 to 200 printable characters without spaces")
    return CLIENT_ID_PREFIX + replica


class TelemetryIngestor:
    """Subscribes to every device's telemetry, presence and status and stores them;
    ``start()``/``stop()`` bracket it."""

    def __init__(
        self,
        *,
        engine: Engine,
        broker_url: str,
        client_id: str = "edgefleet-controlplane",
        batch_size: int = 500,
        flush_interval: float = 0.2,
        keepalive_s: int = 30,
        session_expiry_s: int = SESSION_EXPIRY_S,
        tls_context: ssl.SSLContext | None = None,
        retiring: bool = False,
    ) -> None:
        """Raises BrokerUrlError for a bad URL; an unreachable broker is retried, not raised.
        ``client_id`` must be this replica's own (``replica_client_id``). ``retiring``: resume
        the replica's session but leave the share group at once, so only what the session
        already holds arrives (``retire_replica``); needs MQTT v5."""
        if batch_size < 1 or flush_interval <= 0 or session_expiry_s < 1:
            raise ValueError("batch_size and session_expiry_s must be >= 1 and flush_interval > 0")
        self._address: BrokerAddress = parse_broker_url(broker_url)
        if retiring and not self._address.v5:
            raise ValueError("retiring a replica needs an MQTT v5 broker (no shared subscriptions on 3.1.1)")
        self._client_id = client_id
        self._keepalive_s = keepalive_s
        self._session_expiry_s = session_expiry_s
        self._tls_context = tls_context
        # Bounded: Mosquitto 2.0.11 stops honouring Receive Maximum once acknowledgements flow
        # and pushes a whole backlog at us (17,000 unacknowledged messages seen). A full inbox
        # blocks the network thread, which stops reading the socket, and TCP holds the rest in
        # the broker, where it is safe: memory stays bounded after any outage.
        self._max_pending = 2 * batch_size  # one batch being written, the next one arriving
        self._stopping = threading.Event()
        self._inbox = Inbox(max_messages=self._max_pending, stopping=self._stopping, poll_s=flush_interval)
        self._counters = IngestCounters()
        self._clock = IngestClock()
        self._connected = threading.Event()
        self._subscribed = threading.Event()
        self._retiring = retiring
        self._connection = 0
        self._client: mqtt.Client | None = None
        self._writer: threading.Thread | None = None
        self._batches = BatchWriter(
            engine=engine,
            inbox=self._inbox,
            ack=self._ack,
            counters=self._counters,
            clock=self._clock,
            stopping=self._stopping,
            batch_size=batch_size,
            flush_interval=flush_interval,
        )

    # counters --------------------------------------------------------------------------------

    def stats(self) -> IngestStats:
        return self._counters.snapshot(self.stalled_seconds())

    def stalled_seconds(self) -> float:
        """Seconds since the last successful write while messages wait for the writer (0 when
        none waits): grows while the database is out of reach or the writer is gone."""
        return self._clock.stalled_seconds(waiting=self._inbox.waiting() > 0)

    def disconnected_seconds(self) -> float:
        """Seconds since the ingestor lost (or has not yet made) its broker connection; 0 while
        connected."""
        return self._clock.disconnected_seconds()

    def writer_alive(self) -> bool:
        return self._writer is not None and self._writer.is_alive()

    def healthy(self, stall_after_s: float) -> bool:
        """Whether ingestion works: the writer runs, no message has waited for it longer than
        ``stall_after_s`` seconds, and the broker connection is up (or down for less)."""
        return (
            self.writer_alive()
            and self.stalled_seconds() < stall_after_s
            and self.disconnected_seconds() < stall_after_s
        )

    @property
    def received(self) -> int:
        return self.stats().received

    @property
    def stored(self) -> int:
        """Telemetry messages written (see IngestStats.rows for their records)."""
        return self.stats().stored

    @property
    def rejected(self) -> int:
        return self.stats().rejected

    def wait_subscribed(self, timeout: float) -> bool:
        """True once the broker has confirmed the subscriptions (retiring: their removal) within
        ``timeout`` seconds."""
        return self._subscribed.wait(timeout)

    # lifecycle -------------------------------------------------------------------------------

    def start(self) -> None:
        """Starts connecting in the background and the writer thread; returns immediately. If
        starting fails half-way, what had started is stopped before the error is raised."""
        if self._client is not None:
            raise RuntimeError("ingestor already started")
        self._stopping.clear()
        self._clock.connecting()
        self._writer = threading.Thread(target=self._run_writer, name="telemetry-writer", daemon=True)
        self._writer.start()
        try:
            self._connect()
        except BaseException:
            self.stop()
            raise
        logger.info("telemetry ingestor %s started towards %s", self._client_id, self._address.url)

    def _connect(self) -> None:
        """Makes the client, connects in the background (paho retries with backoff) and starts
        its network thread."""
        client = self._make_client()
        self._client = client
        if self._address.v5:
            session = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            session.SessionExpiryInterval = self._session_expiry_s
            # The broker may have this many messages unacknowledged with us; since we acknowledge
            # only after the commit, it is what one database write can hold (the default, 20 on
            # Mosquitto, would cap a write at 20 messages and the rate at 20 per commit) while the
            # next batch arrives.
            session.ReceiveMaximum = min(self._max_pending, 65535)
            # Nothing larger than a message we would store: the broker drops it for us instead
            # of sending it (deploy/mosquitto refuses it at publish already).
            session.MaximumPacketSize = MAX_MESSAGE_BYTES + 64 * 1024  # payload, topic, properties
            client.connect_async(
                self._address.host,
                self._address.port,
                keepalive=self._keepalive_s,
                clean_start=False,  # on every connect: the session holds what arrived while away
                properties=session,
            )
        else:
            logger.warning(
                "%s speaks MQTT 3.1.1: no shared subscriptions, so run only one control-plane replica",
                self._address.url,
            )
            client.connect_async(self._address.host, self._address.port, keepalive=self._keepalive_s)
        client.loop_start()

    def stop(self, timeout: float = 10.0, *, end_session: bool = False) -> bool:
        """Writes what has arrived, acknowledges it, then disconnects, keeping the session.
        Returns whether everything received was written.

        Anything not written by then stays unacknowledged and the broker redelivers it to this
        client id on the next start. ``end_session`` (MQTT v5) ends the session instead, but
        only when everything received was written; otherwise the session is kept.
        """
        self._stopping.set()
        written = True
        if self._writer is not None:
            self._writer.join(timeout)
            if self._writer.is_alive():
                logger.warning("telemetry writer did not finish within %.1f s", timeout)
                written = False
            self._writer = None
        written = written and self._inbox.drained()
        client = self._client
        if client is not None:
            if end_session and written and self._address.v5:
                ending = Properties(PacketTypes.DISCONNECT)  # type: ignore[no-untyped-call]
                ending.SessionExpiryInterval = 0
                client.disconnect(properties=ending)
            else:
                if end_session:
                    logger.warning("keeping session %s: not everything received was written", self._client_id)
                client.disconnect()
            client.loop_stop()
            self._client = None
        self._connected.clear()
        self._subscribed.clear()
        return written

    def _make_client(self) -> mqtt.Client:
        if self._address.v5:
            client = mqtt.Client(
                CallbackAPIVersion.VERSION2,
                client_id=self._client_id,
                protocol=self._address.protocol,
                manual_ack=True,  # PUBACK only after the database commit
            )
        else:
            client = mqtt.Client(
                CallbackAPIVersion.VERSION2,
                client_id=self._client_id,
                clean_session=False,  # the broker queues QoS 1 telemetry for us while we are down
                protocol=self._address.protocol,
                manual_ack=True,
            )
        client.enable_logger(logging.getLogger("paho.ingest"))
        configure_client(client, self._address, self._tls_context)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_subscribe = self._on_subscribe
        client.on_unsubscribe = self._on_unsubscribe
        client.on_message = self._on_message
        return client

    def _subscriptions(self) -> list[tuple[str, SubscribeOptions]] | list[tuple[str, int]]:
        """QoS 1 on telemetry, presence and status; shared by the replicas on MQTT v5.

        Mosquitto 2.0.11 delivers retained messages to a new shared subscription too: a new
        replica learns every device's presence and status at once. Renewing the subscription on
        a reconnect does not replay them (Retain Handling 1); the session queued what changed.
        """
        filters = [telemetry_subscription(), presence_subscription(), status_subscription()]
        if not self._address.v5:
            return [(f, 1) for f in filters]
        retained = SubscribeOptions(qos=1, retainHandling=SubscribeOptions.RETAIN_SEND_IF_NEW_SUB)
        return [(shared(f, SHARED_GROUP), retained) for f in filters]

    # paho callbacks (network thread) ---------------------------------------------------------

    def _on_connect(
        self,
        client: mqtt.Client,
        userdata: Any,
        flags: mqtt.ConnectFlags,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        if reason_code.is_failure:
            logger.warning("broker %s refused the ingestor: %s", self._address.url, reason_code)
            return
        self._connection += 1
        self._connected.set()
        self._clock.connected()
        if self._connection > 1 and not flags.session_present:
            # The broker forgot us (restarted without persistence, session expired or ended by
            # another client): what it held for us is gone; subscribing again below restores
            # the flow of new messages.
            with self._counters.lock:
                self._counters.sessions_lost += 1
            logger.error(
                "broker %s no longer held session %s; subscribing again", self._address.url, self._client_id
            )
        if self._retiring:
            # Leaving the group stops the broker from routing new messages here; those the
            # session already holds are still delivered.
            client.unsubscribe([topic_filter for topic_filter, _ in self._subscriptions()])
        else:
            # Subscribing on every connect covers a broker that lost our session (restart without
            # persistence); with the session present it is a harmless repeat.
            client.subscribe(self._subscriptions())
        logger.info(
            "ingestor connected to %s (session present: %s)", self._address.url, flags.session_present
        )

    def _on_subscribe(
        self,
        client: mqtt.Client,
        userdata: Any,
        mid: int,
        reason_codes: list[ReasonCode],
        properties: Properties | None,
    ) -> None:
        if any(rc.is_failure for rc in reason_codes):
            logger.error("broker refused the telemetry subscriptions: %s", reason_codes)
            return
        self._subscribed.set()

    def _on_unsubscribe(
        self,
        client: mqtt.Client,
        userdata: Any,
        mid: int,
        reason_codes: list[ReasonCode],
        properties: Properties | None,
    ) -> None:
        self._subscribed.set()  # "no subscription existed" (0x11) is as good: nothing routes here

    def _on_disconnect(
        self,
        client: mqtt.Client,
        userdata: Any,
        flags: mqtt.DisconnectFlags,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        self._connected.clear()
        self._subscribed.clear()
        self._clock.disconnected()
        if not self._stopping.is_set():
            with self._counters.lock:
                self._counters.disconnects += 1
            # On MQTT v5 "session taken over" (0x8E) says another client connected with our
            # client id; on 3.1.1 the broker just closes the socket. Either way paho reconnects
            # with backoff and _on_connect subscribes again.
            logger.warning(
                "ingestor %s lost the broker (%s); reconnecting with backoff", self._client_id, reason_code
            )

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        """Only queues the message: decoding happens on the writer thread. Work done here holds
        the GIL whenever SQLite, on the writer thread, lets go of it for a moment (once per row
        inserted), and the writer would then wait up to the interpreter's switch interval for
        it back, each time: decoding here made a 5,000-row insert take seconds instead of 0.2 s.
        An oversized payload is cut to its excerpt at once: it is refused, and only that is kept.
        Waits while the inbox is full (flow control); a message given up because ingestion is
        stopping is left unacknowledged: the broker redelivers it to this session."""
        inbound = Inbound.received(message, self._connection)
        with self._counters.lock:
            self._counters.received += 1
        self._inbox.put(inbound)

    # writer thread ---------------------------------------------------------------------------

    def _run_writer(self) -> None:
        """The writer thread's body: `batch_writer` decodes, stores and calls ``_ack``."""
        self._batches.run()

    def _ack(self, batch: list[Inbound]) -> None:
        """PUBACKs in arrival order, as MQTT asks; skips mids from an older connection."""
        client = self._client
        if client is None or not self._connected.is_set():
            return
        current = self._connection
        for item in batch:
            if item.qos > 0 and item.connection == current:
                client.ack(item.mid, item.qos)
