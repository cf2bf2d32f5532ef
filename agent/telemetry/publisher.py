"""Moves outbox records to the MQTT broker in batches at QoS 1, deleting them only when the
broker has them; announces the device's presence and keeps its latest status retained.

Wire format (protos/fleet/v1/telemetry.proto): a PUBLISH on a record stream topic carries a JSON
array of consecutive outbox records of that topic's kind, oldest first (``encode_batch``), at
most ``max_batch_records`` records and ``max_batch_bytes`` bytes, so a backlog after an outage
costs a few large messages rather than one per record. On MQTT v5, metric streams
(``METRIC_KINDS``) carry a Message Expiry Interval: a heartbeat a week old is not worth queueing
for a subscriber that has been away that long. Deployment events never expire.

Presence (``presence_topic``) and status (``status_topic``) are retained QoS 1 JSON objects,
outside the outbox because only the latest of each matters: the Last Will says "offline,
connection lost", every connect says "online, connected", a clean stop says "offline, agent
stopped"; the latest DeviceStatus is published when set and again after every reconnect.

The same connection carries what the control plane tells this device (``listener``: its
desired-state notices, agent/tasks/desired_notices.py): subscribed again after every connect
(the session starts clean), each message on that topic handed to the listener, and the
listener told when the subscription holds and when the connection is lost.

Threads: paho's network thread (``loop_start``) runs the callbacks and paho's own reconnect
backoff; one drain thread of ours reads the outbox, hands batches to paho and applies the
broker's acknowledgements. The callbacks only queue what happened and wake the drain thread,
so every piece of bookkeeping has one owner and no lock of ours is ever held across a paho
call. Nothing here raises into the agent: a dead broker only means records wait in the outbox.
This module owns the connection (paho client, presence, status, start and stop) and hands
batches to paho; what each acknowledgement means for the outbox is edgefleet.agent.telemetry.drain's.

Delivery contract, end to end:
- a record is in at most one message that paho holds; paho keeps unacknowledged QoS 1 messages
  and resends them itself after a reconnect (``dup`` set);
- records leave the outbox only when the PUBACK for the message carrying them arrives, and on
  MQTT v5 only when it does not say "no matching subscribers": a broker that has no control
  plane's session to give them to would drop them;
- after every (re)connect the drain re-reads the outbox from the start, so a record that was
  never handed to paho, or whose delete failed, goes out again. Duplicates on the wire are
  expected; the control plane drops them by (device_id, seq).
- the clean start is deliberate: the outbox is the session, nothing needs to live in the broker.
"""

from __future__ import annotations

import logging
import ssl
import threading
import time
from contextlib import suppress
from datetime import UTC, datetime
from typing import Any, Protocol

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from edgefleet.agent.telemetry.drain import Batch, OutboxDrain, batch_records
from edgefleet.agent.telemetry.outbox import Outbox, OutboxError, OutboxItem, encode_message
from edgefleet.protos.fleet.broker_url import BrokerAddress, configure_client, parse_broker_url
from edgefleet.protos.fleet.topics import (
    METRIC_KINDS,
    TopicKind,
    presence_topic,
    status_topic,
    telemetry_topic,
)
from edgefleet.protos.fleet.v1 import telemetry_pb2

logger = logging.getLogger(__name__)

DEFAULT_MESSAGE_EXPIRY_S = 7 * 24 * 3600
MAX_BATCH_RECORDS = 100
MAX_BATCH_BYTES = 128 * 1024  # below Mosquitto's max_packet_size in deploy/mosquitto (256 KiB)
MQTT_MAX_PACKET = 268_435_455 + 5  # the largest packet MQTT can frame (remaining length + header)
PUBLISH_OVERHEAD = 64  # fixed header, topic length, packet id and v5 properties, with room to spare
GOODBYE_ACK_WAIT_S = 1.0
MAX_WINDOW = 10_000  # far below the 65535 message ids paho cycles through


class BrokerListener(Protocol):
    """Receives one topic's messages on the publisher's connection. Called on paho's network
    thread: each method must only hand over what happened, never block."""

    @property
    def topic(self) -> str: ...

    def subscribed(self) -> None:
        """The broker granted the subscription: messages arrive from now on."""

    def lost(self) -> None:
        """The connection (or the subscription) is gone: messages may be missed."""

    def received(self, payload: bytes) -> None:
        """A message on ``topic``."""


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
        window: int = 1000,
        max_batch_records: int = MAX_BATCH_RECORDS,
        max_batch_bytes: int = MAX_BATCH_BYTES,
        message_expiry_s: int = DEFAULT_MESSAGE_EXPIRY_S,
        keepalive_s: int = 30,
        poll_interval_s: float = 1.0,
        tls_context: ssl.SSLContext | None = None,
        listener: BrokerListener | None = None,
    ) -> None:
        """Raises BrokerUrlError or TopicError for bad configuration; never for an absent broker.

        ``max_inflight`` is the MQTT in-flight limit (messages); ``window`` bounds how many
        records are handed to paho at once, which bounds the memory a long outage can cost.
        ``message_expiry_s`` is the Message Expiry Interval of heartbeat and inference messages
        on MQTT v5 (0: none).
        """
        _check_limits(max_inflight, window, max_batch_records, max_batch_bytes, message_expiry_s)
        self._address: BrokerAddress = parse_broker_url(broker_url)
        self._device_id = device_id
        self._topics = {kind: telemetry_topic(device_id, kind) for kind in TopicKind}
        self._presence_topic = presence_topic(device_id)
        self._status_topic = status_topic(device_id)
        self._outbox = outbox
        self._client_id = client_id or device_id  # the broker ends this session on revocation
        self._max_inflight = max_inflight
        self._window = window
        self._max_batch_records = max_batch_records
        self._max_batch_bytes = max_batch_bytes
        self._message_expiry_s = message_expiry_s
        self._keepalive_s = keepalive_s
        self._poll_interval_s = poll_interval_s
        self._tls_context = tls_context
        self._listener = listener
        self._reconnected = threading.Event()  # on_connect: re-read the outbox from the start
        self._drain = OutboxDrain(outbox, self._reconnected)
        self._status_due = threading.Event()  # the latest status still has to be published
        self._status_lock = threading.Lock()
        self._status: telemetry_pb2.DeviceStatus | None = None
        self._server_max_packet = MQTT_MAX_PACKET  # the broker's Maximum Packet Size (v5 CONNACK)
        self._inflight_cap = max_inflight  # telemetry messages in flight: ours, or the broker's less
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._connected = threading.Event()
        self._stop_deadline = 0.0
        self._client: mqtt.Client | None = None
        self._thread: threading.Thread | None = None
        self._published = 0

    @property
    def device_id(self) -> str:
        return self._device_id

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    @property
    def published(self) -> int:
        """Telemetry PUBLISH packets handed to paho (first sends only; paho's resends not counted)."""
        return self._published

    @property
    def acknowledged(self) -> int:
        """Records the broker acknowledged."""
        return self._drain.acknowledged

    @property
    def discarded(self) -> int:
        """Records this publisher discarded because the broker would never take them."""
        return self._drain.discarded

    def nudge(self) -> None:
        """Tells the drain thread new records are waiting; cheap and safe from any thread."""
        self._wake.set()

    def wait_connected(self, timeout: float) -> bool:
        """True once connected to the broker within ``timeout`` seconds."""
        return self._connected.wait(timeout)

    def set_status(self, status: telemetry_pb2.DeviceStatus) -> None:
        """Keeps ``status`` as the device's latest and publishes it retained (QoS 1) now if
        connected, and again after every reconnect. Only the latest matters, so it bypasses the
        outbox: a status replaced before it could be sent is simply never sent.

        Fills in the device id, schema version and time when unset; raises ValueError for a
        status of another device. Safe from any thread.
        """
        latest = telemetry_pb2.DeviceStatus()
        latest.CopyFrom(status)
        if latest.device_id and latest.device_id != self._device_id:
            raise ValueError(f"status of {latest.device_id!r} given to {self._device_id!r}'s publisher")
        latest.device_id = self._device_id
        latest.schema_version = latest.schema_version or telemetry_pb2.TELEMETRY_SCHEMA_V1
        if not latest.HasField("time"):
            latest.time.FromDatetime(datetime.now(UTC))
        with self._status_lock:
            self._status = latest
        self._status_due.set()
        self._wake.set()

    def start(self) -> None:
        """Starts connecting (in the background) and draining; returns immediately."""
        if self._thread is not None:
            raise RuntimeError("publisher already started")
        self._stopping.clear()
        self._drain.reset()
        self._reconnected.clear()
        client = self._make_client()
        self._client = client
        if self._address.v5:
            # Clean start with the default Session Expiry of 0: the outbox is the session.
            client.connect_async(
                self._address.host, self._address.port, keepalive=self._keepalive_s, clean_start=True
            )
        else:
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
        the outbox and is sent after the next start. A connected publisher says goodbye
        (retained Presence offline, "agent stopped") and disconnects cleanly, so the broker
        discards the Last Will.
        """
        self._stop_deadline = time.monotonic() + timeout
        self._stopping.set()
        self._wake.set()
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(max(0.0, self._stop_deadline - time.monotonic()))
            if thread.is_alive():
                logger.warning("telemetry drain thread did not stop within %.1f s", timeout)
        client, self._client = self._client, None
        if client is not None:
            self._say_goodbye(client)
            client.disconnect()
            client.loop_stop()
        self._connected.clear()
        if thread is None or not thread.is_alive():
            self._drain.settle()  # PUBACKs that arrived after the drain thread left

    # paho callbacks (network thread): record what happened, wake the drain ---------------------

    def _make_client(self) -> mqtt.Client:
        if self._address.v5:
            client = mqtt.Client(
                CallbackAPIVersion.VERSION2, client_id=self._client_id, protocol=self._address.protocol
            )
        else:
            client = mqtt.Client(
                CallbackAPIVersion.VERSION2,
                client_id=self._client_id,
                clean_session=True,  # the outbox is the session: nothing needs to live in the broker
                protocol=self._address.protocol,
            )
        client.enable_logger(logging.getLogger("paho.agent"))
        client.max_inflight_messages_set(self._max_inflight)
        client.max_queued_messages_set(0)  # the window bounds what we queue
        # The broker publishes this, retained, when the connection dies without a DISCONNECT.
        client.will_set(
            self._presence_topic,
            self._presence(online=False, reason="connection lost", timed=False),
            qos=1,
            retain=True,
        )
        configure_client(client, self._address, self._tls_context)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_publish = self._on_publish
        client.on_subscribe = self._on_subscribe
        client.on_message = self._on_message
        return client

    def _presence(self, *, online: bool, reason: str, timed: bool = True) -> bytes:
        """A Presence payload, stamped now unless ``timed`` is False (the Last Will: the broker
        sends it whenever the connection dies, so no time written now would be right)."""
        presence = telemetry_pb2.Presence(
            schema_version=telemetry_pb2.TELEMETRY_SCHEMA_V1,
            device_id=self._device_id,
            online=online,
            reason=reason,
        )
        if timed:
            presence.time.FromDatetime(datetime.now(UTC))
        return encode_message(presence)

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
        self._apply_broker_limits(properties)
        client.publish(
            self._presence_topic, self._presence(online=True, reason="connected"), qos=1, retain=True
        )
        if self._listener is not None:
            client.subscribe(self._listener.topic, qos=1)
        self._reconnected.set()
        self._status_due.set()
        self._connected.set()
        logger.info("telemetry connected to %s", self._address.url)
        self._wake.set()

    def _apply_broker_limits(self, properties: Properties | None) -> None:
        """paho does not enforce a v5 broker's Receive Maximum or Maximum Packet Size (nor lets
        its in-flight limit change once connected); the drain does, since exceeding either
        lets the broker drop the connection. Two of the broker's slots stay free for presence
        and status."""
        receive_maximum = int(getattr(properties, "ReceiveMaximum", 0))
        cap = min(self._max_inflight, receive_maximum - 2) if receive_maximum else self._max_inflight
        self._inflight_cap = max(1, cap)
        self._server_max_packet = int(getattr(properties, "MaximumPacketSize", MQTT_MAX_PACKET))

    def _on_disconnect(
        self,
        client: mqtt.Client,
        userdata: Any,
        flags: mqtt.DisconnectFlags,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        self._connected.clear()
        self._wake.set()
        if self._listener is not None:
            self._listener.lost()
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
        # Runs under paho's message lock: no lock of ours here, only a thread-safe append.
        self._drain.acknowledge(mid, reason_code)
        self._wake.set()

    def _on_subscribe(
        self,
        client: mqtt.Client,
        userdata: Any,
        mid: int,
        reason_codes: list[ReasonCode],
        properties: Properties | None,
    ) -> None:
        if self._listener is None:
            return
        refused = [code for code in reason_codes if code.is_failure]
        if refused:
            logger.warning("broker refused the subscription to %s: %s", self._listener.topic, refused[0])
            self._listener.lost()
        else:
            self._listener.subscribed()

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        if self._listener is not None and message.topic == self._listener.topic:
            self._listener.received(bytes(message.payload))

    # drain thread ------------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            self._wake.wait(self._poll_interval_s)
            self._wake.clear()
            try:
                self._drain.settle()
                if self._stopping.is_set():
                    if self._may_leave():
                        return
                    continue
                if self._connected.is_set():
                    self._publish_status()
                    self._publish_pending()
            except OutboxError:
                logger.exception("telemetry outbox failed; records wait until it works again")
            except Exception:  # the agent keeps serving whatever goes wrong with telemetry
                logger.exception("unexpected error in the telemetry publisher")

    def _may_leave(self) -> bool:
        """While stopping: leave once nothing is in flight, the broker is gone, or time is up."""
        drain = self._drain
        return not drain.inflight or not self._connected.is_set() or time.monotonic() >= self._stop_deadline

    def _publish_status(self) -> None:
        client = self._client
        if client is None or not self._status_due.is_set():
            return
        self._status_due.clear()
        with self._status_lock:
            status = self._status
        if status is not None:
            client.publish(self._status_topic, encode_message(status), qos=1, retain=True)

    def _publish_pending(self) -> None:
        client = self._client
        drain = self._drain
        if client is None or time.monotonic() < drain.resume_at:
            return
        if self._reconnected.is_set():
            self._reconnected.clear()
            drain.cursor = 0
        while self._may_publish():
            room = self._window - drain.inflight_records()
            items = self._outbox.pending(room, after=drain.cursor)
            if not items or not self._send_all(client, items):
                return  # nothing more, or no room left: the next PUBACK wakes us
            drain.cursor = max(drain.cursor, items[-1].seq)

    def _may_publish(self) -> bool:
        """Connected, not stopping, and room in both the record window and the in-flight cap."""
        drain = self._drain
        return (
            self._connected.is_set()
            and not self._stopping.is_set()
            and drain.inflight_records() < self._window
            and len(drain.inflight) < self._inflight_cap
        )

    def _send_all(self, client: mqtt.Client, items: list[OutboxItem]) -> bool:
        """Batches and sends the records of ``items`` not already in flight; False when it had
        to stop early (the cursor then stays after the last batch sent)."""
        drain = self._drain
        fresh = [item for item in items if item.seq not in drain.busy]
        for batch in batch_records(fresh, max_records=self._max_batch_records, max_bytes=self._batch_bytes()):
            if not self._may_publish() or not self._send(client, batch):
                return False
            drain.cursor = batch.seqs[-1]
        return True

    def _batch_bytes(self) -> int:
        """The payload size a batch may reach: ours, or less if the broker accepts less."""
        longest_topic = max(len(topic) for topic in self._topics.values())
        return min(self._max_batch_bytes, self._server_max_packet - PUBLISH_OVERHEAD - longest_topic)

    def _send(self, client: mqtt.Client, batch: Batch) -> bool:
        """Hands one batch to paho; False if paho did not take it (try again later)."""
        topic = self._topics[batch.kind]
        if len(batch.payload) + len(topic) + PUBLISH_OVERHEAD > self._server_max_packet:
            logger.error(
                "%s record %d is larger than the broker accepts (%d bytes); discarding it",
                batch.kind.value,
                batch.seqs[0],
                self._server_max_packet,
            )
            self._drain.discard(batch.seqs)  # one record: batch_records keeps batches of several below it
            return True
        info = client.publish(topic, batch.payload, qos=1, properties=self._properties(batch.kind))
        if info.rc == MQTTErrorCode.MQTT_ERR_QUEUE_SIZE:
            return False
        if info.rc not in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_NO_CONN):
            # paho still holds the message and resends it after reconnecting.
            logger.debug("publish of seqs %d-%d returned %s", batch.seqs[0], batch.seqs[-1], info.rc)
        self._published += 1
        self._drain.sent(info.mid, batch)
        return True

    def _properties(self, kind: TopicKind) -> Properties | None:
        """MQTT v5 PUBLISH properties: a Message Expiry Interval on metrics, nothing otherwise."""
        if not self._address.v5 or kind not in METRIC_KINDS or not self._message_expiry_s:
            return None
        properties = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        properties.MessageExpiryInterval = self._message_expiry_s
        return properties

    def _say_goodbye(self, client: mqtt.Client) -> None:
        """Retained Presence offline ("agent stopped"), waiting briefly for its PUBACK so the
        DISCONNECT right after it does not overtake it in a slow network."""
        if not self._connected.is_set():
            return
        info = client.publish(
            self._presence_topic, self._presence(online=False, reason="agent stopped"), qos=1, retain=True
        )
        wait = min(GOODBYE_ACK_WAIT_S, max(0.0, self._stop_deadline - time.monotonic()))
        with suppress(RuntimeError, ValueError):  # not connected any more: the Will speaks for us
            info.wait_for_publish(wait)


def _check_limits(
    max_inflight: int, window: int, max_batch_records: int, max_batch_bytes: int, message_expiry_s: int
) -> None:
    if max_inflight < 1 or not max_inflight <= window <= MAX_WINDOW:
        raise ValueError(f"need 1 <= max_inflight <= window <= {MAX_WINDOW}")
    if not 1 <= max_batch_records <= window:
        raise ValueError("need 1 <= max_batch_records <= window")
    if max_batch_bytes < 1024:
        raise ValueError("max_batch_bytes must be at least 1024")
    if message_expiry_s < 0:
        raise ValueError("message_expiry_s must be 0 (none) or more")
