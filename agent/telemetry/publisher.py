"""Moves outbox records to the MQTT broker at QoS 1, deleting each only when the broker has it.

Threads: paho's network thread (``loop_start``) runs the callbacks and paho's own reconnect
backoff; one drain thread of ours reads the outbox and hands records to paho. The two meet in a
small bookkeeping structure under one lock, and nothing here ever raises into the agent: a dead
broker only means records wait in the outbox.

Delivery contract, end to end:
- a record is published once per connection life of this client; paho keeps unacknowledged
  QoS 1 publishes and resends them itself after a reconnect (``dup`` set);
- the record leaves the outbox only in response to ``on_publish`` for its message id, i.e. the
  broker's PUBACK;
- after every (re)connect the drain re-reads the outbox from the start, so a record that was
  never handed to paho, or whose delete failed, goes out again. Duplicates on the wire are
  expected; the control plane drops them by (device_id, seq).
"""

from __future__ import annotations

import logging
import ssl
import threading
import time
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from agent.telemetry.outbox import Outbox, OutboxError
from protos.fleet.broker_url import BrokerAddress, configure_client, parse_broker_url
from protos.fleet.topics import TopicKind, telemetry_topic

logger = logging.getLogger(__name__)


class _Ledger:
    """Which outbox records paho currently holds, by MQTT message id; guarded by its condition.

    ``early`` exists because paho may run ``on_publish`` for a message between ``publish()``
    returning and the caller recording the mid (the network thread handles the PUBACK as soon
    as paho's own lock is released). Taking our lock around ``publish()`` would deadlock with
    paho's lock held during ``on_publish``, so the early acks are parked here instead.
    """

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.inflight: dict[int, int] = {}  # mid -> seq, handed to paho, not yet acked
        self.early: set[int] = set()  # mids acked before publish() returned
        self.busy: set[int] = set()  # seqs in flight or acked but not yet deleted
        self.acked: list[int] = []  # seqs the broker acknowledged, to delete from the outbox
        self.cursor = 0  # highest seq handed to paho in this pass over the outbox
        self.resync = True  # set on (re)connect: re-read the outbox from the start


class TelemetryPublisher:
    """Publishes one device's outbox to the broker; ``start()``/``stop()`` bracket its life."""

    def __init__(
        self,
        *,
        device_id: str,
        broker_url: str,
        outbox: Outbox,
        client_id: str | None = None,
        max_inflight: int = 20,
        window: int = 200,
        keepalive_s: int = 30,
        poll_interval_s: float = 1.0,
        tls_context: ssl.SSLContext | None = None,
    ) -> None:
        """Raises BrokerUrlError or TopicError for bad configuration; never for an absent broker.

        ``max_inflight`` is the MQTT in-flight limit; ``window`` bounds how many records are
        handed to paho at once, which bounds the memory a long outage can cost.
        """
        if max_inflight < 1 or window < max_inflight:
            raise ValueError("need 1 <= max_inflight <= window")
        self._address: BrokerAddress = parse_broker_url(broker_url)
        self._device_id = device_id
        self._topics = {kind: telemetry_topic(device_id, kind) for kind in TopicKind}
        self._outbox = outbox
        self._client_id = client_id or device_id  # the broker ends this session on revocation
        self._max_inflight = max_inflight
        self._window = window
        self._keepalive_s = keepalive_s
        self._poll_interval_s = poll_interval_s
        self._tls_context = tls_context
        self._ledger = _Ledger()
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._connected = threading.Event()
        self._client: mqtt.Client | None = None
        self._thread: threading.Thread | None = None
        self._published = 0
        self._acknowledged = 0

    @property
    def device_id(self) -> str:
        return self._device_id

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    @property
    def published(self) -> int:
        """PUBLISH packets handed to paho (first sends only; paho's own resends not counted)."""
        return self._published

    @property
    def acknowledged(self) -> int:
        """Records the broker acknowledged."""
        return self._acknowledged

    def nudge(self) -> None:
        """Tells the drain thread new records are waiting; cheap and safe from any thread."""
        self._wake.set()

    def wait_connected(self, timeout: float) -> bool:
        """True once connected to the broker within ``timeout`` seconds."""
        return self._connected.wait(timeout)

    def start(self) -> None:
        """Starts connecting (in the background) and draining; returns immediately."""
        if self._thread is not None:
            raise RuntimeError("publisher already started")
        self._stopping.clear()
        with self._ledger.cond:
            self._ledger = _Ledger()
        client = self._make_client()
        self._client = client
        client.connect_async(self._address.host, self._address.port, keepalive=self._keepalive_s)
        client.loop_start()
        self._thread = threading.Thread(
            target=self._run, name=f"telemetry-publisher-{self._device_id}", daemon=True
        )
        self._thread.start()
        logger.info("telemetry publisher for %s started towards %s", self._device_id, self._address.url)

    def stop(self, timeout: float = 5.0) -> None:
        """Stops within about ``timeout`` seconds (plus paho's 5 s connect timeout at worst).

        In-flight records get until the deadline to be acknowledged; whatever is not stays in
        the outbox and is sent after the next start.
        """
        deadline = time.monotonic() + timeout
        self._stopping.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(max(0.0, deadline - time.monotonic()))
            if self._thread.is_alive():
                logger.warning("telemetry drain thread did not stop within %.1f s", timeout)
            self._thread = None
        client = self._client
        if client is not None:
            with self._ledger.cond:
                self._ledger.cond.wait_for(
                    lambda: not self._ledger.inflight or not self._connected.is_set(),
                    timeout=max(0.0, deadline - time.monotonic()),
                )
            client.disconnect()
            client.loop_stop()
            self._client = None
        self._connected.clear()
        self._flush_acks()

    # paho callbacks (network thread) -------------------------------------------------------

    def _make_client(self) -> mqtt.Client:
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=self._client_id,
            clean_session=True,  # the outbox is the session: nothing needs to live in the broker
            protocol=MQTTProtocolVersion.MQTTv311,
        )
        client.enable_logger(logging.getLogger("paho.agent"))
        client.max_inflight_messages_set(self._max_inflight)
        client.max_queued_messages_set(0)  # the window bounds what we queue
        configure_client(client, self._address, self._tls_context)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_publish = self._on_publish
        return client

    def _on_connect(
        self,
        client: mqtt.Client,
        userdata: Any,
        flags: mqtt.ConnectFlags,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        if reason_code.is_failure:
            logger.warning("broker %s refused the connection: %s", self._address.url, reason_code)
            return
        with self._ledger.cond:
            self._ledger.resync = True
        self._connected.set()
        logger.info("telemetry connected to %s", self._address.url)
        self._wake.set()

    def _on_disconnect(
        self,
        client: mqtt.Client,
        userdata: Any,
        flags: mqtt.DisconnectFlags,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        self._connected.clear()
        with self._ledger.cond:
            self._ledger.cond.notify_all()
        if not self._stopping.is_set():
            logger.warning("telemetry lost the broker (%s); paho reconnects with backoff", reason_code)

    def _on_publish(
        self,
        client: mqtt.Client,
        userdata: Any,
        mid: int,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        if reason_code.is_failure:
            # Only MQTT v5 brokers refuse in a PUBACK; resending would be refused again.
            logger.error("broker refused telemetry message %d: %s; dropping it", mid, reason_code)
        with self._ledger.cond:
            seq = self._ledger.inflight.pop(mid, None)
            if seq is None:
                self._ledger.early.add(mid)
                return
            self._ledger.acked.append(seq)
            self._ledger.cond.notify_all()
        self._wake.set()

    # drain thread --------------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stopping.is_set():
            self._wake.wait(self._poll_interval_s)
            self._wake.clear()
            try:
                self._flush_acks()
                if self._connected.is_set() and not self._stopping.is_set():
                    self._publish_pending()
            except OutboxError:
                logger.exception("telemetry outbox failed; records wait until it works again")
            except Exception:  # the agent keeps serving whatever goes wrong with telemetry
                logger.exception("unexpected error in the telemetry publisher")

    def _flush_acks(self) -> None:
        with self._ledger.cond:
            acked, self._ledger.acked = self._ledger.acked, []
        if not acked:
            return
        try:
            self._outbox.ack_many(acked)
        except OutboxError:
            logger.exception("could not delete %d acknowledged records; they will be resent", len(acked))
        finally:
            with self._ledger.cond:
                self._ledger.busy.difference_update(acked)
        self._acknowledged += len(acked)

    def _publish_pending(self) -> None:
        client = self._client
        if client is None:
            return
        with self._ledger.cond:
            if self._ledger.resync:
                self._ledger.resync = False
                self._ledger.cursor = 0
            room = self._window - len(self._ledger.inflight)
        while room > 0 and not self._stopping.is_set() and self._connected.is_set():
            with self._ledger.cond:
                cursor = self._ledger.cursor
                busy = set(self._ledger.busy)
            items = self._outbox.pending(min(room, self._window), after=cursor)
            if not items:
                return
            for item in items:
                if item.seq in busy:
                    with self._ledger.cond:
                        self._ledger.cursor = item.seq
                    continue
                info = client.publish(self._topics[item.kind], item.payload, qos=1)
                if info.rc == MQTTErrorCode.MQTT_ERR_QUEUE_SIZE:
                    return  # paho is full; the next ack wakes us
                if info.rc not in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_NO_CONN):
                    # paho still holds the message and resends it after reconnecting.
                    logger.debug("publish of seq %d returned %s", item.seq, info.rc)
                self._published += 1
                with self._ledger.cond:
                    self._ledger.cursor = item.seq
                    self._ledger.busy.add(item.seq)
                    if info.mid in self._ledger.early:
                        self._ledger.early.discard(info.mid)
                        self._ledger.acked.append(item.seq)
                        self._wake.set()
                    else:
                        self._ledger.inflight[info.mid] = item.seq
                room -= 1
                if room <= 0:
                    return
