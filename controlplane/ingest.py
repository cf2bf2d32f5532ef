"""Telemetry ingestion: MQTT subscriber in, batched database writes out.

The chain device outbox → broker → here → database is at-least-once end to end:
- the subscriptions live in a persistent broker session (a fixed client id per replica, MQTT v5
  clean_start=False with a Session Expiry Interval of ``session_expiry_s``), so QoS 1 messages
  published while this replica is down wait in the broker for it;
- a message is acknowledged to the broker (manual PUBACK) only after the batch holding it is
  committed, so a crash between receiving and writing makes the broker redeliver it;
- redeliveries are harmless because the database ignores a repeated (device_id, seq).

Replicas share the load with MQTT v5 shared subscriptions (``$share/controlplane/...``):
the broker hands each message to one member of the group, and each replica writes what it got.
Every replica needs its own client id (``replica_client_id``), or they would take over each
other's session, and that id must stay the same across restarts: Mosquitto keeps routing a
share of the messages to a replica that is down but whose session lives, and they wait there
until it comes back under the same id. A replica taken out of service for good is retired with
``fleetctl retire-replica`` (controlplane.retire), which stores what its session holds and ends
it; otherwise its share waits there until the session expires and is then dropped. Mosquitto
2.0.11 does not restore shared subscriptions from its persistence file: after a broker restart nothing matches
until the replicas subscribe again, and the agents, told so by the v5 PUBACK (no matching
subscribers), keep those records in their outboxes meanwhile. On an MQTT 3.1.1 broker
(``?protocol=3.1.1``, the embedded demo broker) there are no shared subscriptions: one replica.

Record streams carry JSON arrays of records (protos/fleet/v1/telemetry.proto); Presence and
DeviceStatus are single retained objects. paho's network thread only queues what arrives; the
writer thread decodes (controlplane.record_shape) and stores. Writes use group commit: the
writer takes everything that queued up while the previous write ran (up to ``batch_size``
messages), so a burst becomes a few large inserts and a trickle is written immediately. No
message waits for a timer; ``flush_interval`` is only how often an idle writer looks up to see
whether it should stop. The queue holds at most two batches: when it is full the network thread
waits, stops reading the socket, and the backlog stays in the broker.

Nothing a device sends can stop ingestion: malformed payloads, unknown topics and a device
writing under another device's id are acknowledged, counted and logged, never raised.
"""

from __future__ import annotations

import enum
import logging
import queue
import ssl
import threading
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeAlias

import msgspec
import paho.mqtt.client as mqtt
from google.protobuf import json_format
from google.protobuf.message import Message
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions
from sqlalchemy.engine import Engine
from sqlalchemy.exc import SQLAlchemyError
from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception_type,
    sleep_using_event,
    stop_when_event_set,
    wait_exponential,
    wait_random,
)

from controlplane.db.telemetry import IngestRecord, PresenceUpdate, StatusUpdate, store_batch
from controlplane.record_shape import BadShape, decode_records
from protos.fleet.broker_url import BrokerAddress, configure_client, parse_broker_url
from protos.fleet.topics import (
    MESSAGE_TYPES,
    PRESENCE,
    SHARED_GROUP,
    STATUS,
    TopicError,
    device_of,
    parse_telemetry_topic,
    presence_subscription,
    shared,
    status_subscription,
    telemetry_subscription,
)
from protos.fleet.v1 import telemetry_pb2

logger = logging.getLogger(__name__)

SESSION_EXPIRY_S = 14 * 24 * 3600  # as long as Mosquitto keeps a persistent session (deploy/)
CLIENT_ID_PREFIX = "edgefleet-controlplane-"


def replica_client_id(replica: str) -> str:
    """The MQTT client id of one control-plane replica: one persistent session each."""
    if not replica or not replica.isprintable() or any(c.isspace() for c in replica) or len(replica) > 200:
        raise ValueError(f"replica id {replica!r}: need 1 to 200 printable characters without spaces")
    return CLIENT_ID_PREFIX + replica


class RejectReason(enum.Enum):
    """Why a received message was not stored."""

    BAD_TOPIC = "bad_topic"
    MALFORMED = "malformed"
    DEVICE_MISMATCH = "device_mismatch"


class RejectedMessage(ValueError):
    """A message that cannot be stored; ``reason`` says why, the text says what exactly."""

    def __init__(self, reason: RejectReason, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class IngestStats:
    """A snapshot of the ingestor's counters since start. ``stored`` counts telemetry messages
    written, ``rows`` the records they carried (a duplicate the database ignored counts too)."""

    received: int = 0
    stored: int = 0
    rows: int = 0
    presence: int = 0
    status: int = 0
    rejected: int = 0
    malformed: int = 0
    device_mismatch: int = 0
    bad_topic: int = 0
    write_failures: int = 0


@dataclass(frozen=True, slots=True)
class TelemetryBatch:
    """The records of one record-stream message, oldest first."""

    records: tuple[IngestRecord, ...]


Decoded: TypeAlias = TelemetryBatch | PresenceUpdate | StatusUpdate


# decoding (pure, testable without a broker) ----------------------------------------------------


def decode(topic: str, payload: bytes | bytearray, *, arrived: datetime) -> Decoded | None:
    """Turns one MQTT message into something storable, or raises RejectedMessage. None: an
    empty presence or status payload, which only clears the retained message (nothing to store).
    ``arrived`` is when it was received."""
    if topic.endswith("/" + PRESENCE):
        return decode_presence(topic, payload, arrived=arrived) if payload else None
    if topic.endswith("/" + STATUS):
        return decode_status(topic, payload, arrived=arrived) if payload else None
    return decode_message(topic, payload)


def decode_message(topic: str, payload: bytes | bytearray) -> TelemetryBatch:
    """Decodes a record-stream message: a non-empty JSON array of records of the topic's kind.

    One malformed element, or one claiming another device, rejects the whole message: a
    device's own agent never sends such a thing, so none of it can be trusted. The stored
    payload is each record's known fields as the agent wrote them (lowerCamelCase, each checked
    against the type protobuf's JSON mapping gives it by ``record_shape``); unknown fields,
    from a newer schema, are dropped.
    """
    try:
        parsed = parse_telemetry_topic(topic)
    except TopicError as exc:
        raise RejectedMessage(RejectReason.BAD_TOPIC, str(exc)) from exc
    kind = parsed.kind.value
    try:
        elements = decode_records(MESSAGE_TYPES[parsed.kind].DESCRIPTOR, payload)
    except BadShape as exc:
        raise RejectedMessage(RejectReason.MALFORMED, f"{kind} payload on {topic}: {exc}") from exc
    if not elements:
        raise RejectedMessage(RejectReason.MALFORMED, f"{kind} payload on {topic}: an empty array")
    records = []
    for index, body in enumerate(elements):  # runs for every record the fleet sends: kept lean
        try:
            records.append(_record(kind, parsed.device_id, body))
        except RejectedMessage as exc:
            raise RejectedMessage(exc.reason, f"{kind} record {index} on {topic}: {exc}") from exc
    return TelemetryBatch(tuple(records))


def decode_presence(topic: str, payload: bytes | bytearray, *, arrived: datetime) -> PresenceUpdate:
    """Decodes a retained Presence. Its time is the agent's stamp (never later than its arrival:
    a clock running ahead must not pin a device's presence in the future), or the arrival time
    for the Last Will, which carries none."""
    device_id = _device_of(topic, PRESENCE)
    message = telemetry_pb2.Presence()
    _parse_object(message, payload, f"presence on {topic}")
    _check_device(message.device_id, device_id)
    stamped = message.HasField("time")
    when = min(_time(message, topic), arrived) if stamped else arrived
    return PresenceUpdate(
        device_id=device_id, online=message.online, time=when, reason=message.reason, stamped=stamped
    )


def decode_status(topic: str, payload: bytes | bytearray, *, arrived: datetime) -> StatusUpdate:
    """Decodes a retained DeviceStatus: validated and counted; only its time is used."""
    device_id = _device_of(topic, STATUS)
    message = telemetry_pb2.DeviceStatus()
    _parse_object(message, payload, f"status on {topic}")
    _check_device(message.device_id, device_id)
    when = min(_time(message, topic), arrived) if message.HasField("time") else None
    return StatusUpdate(device_id=device_id, time=when)


def _json(payload: bytes | bytearray, where: str) -> Any:
    try:
        return msgspec.json.decode(payload)
    except (msgspec.DecodeError, RecursionError) as exc:  # invalid UTF-8 included
        raise RejectedMessage(RejectReason.MALFORMED, f"{where}: {exc}") from exc


def _parse_object(message: Message, payload: bytes | bytearray, where: str) -> None:
    value = _json(payload, where)
    if not isinstance(value, dict):
        raise RejectedMessage(RejectReason.MALFORMED, f"{where}: not a JSON object")
    try:
        json_format.ParseDict(value, message, ignore_unknown_fields=True)
    except (json_format.ParseError, ValueError, RecursionError) as exc:
        raise RejectedMessage(RejectReason.MALFORMED, f"{where}: {exc}") from exc


def _record(kind: str, device_id: str, body: dict[str, Any]) -> IngestRecord:
    """One record, already checked against its message type, with its identity fields parsed
    strictly."""
    _check_device(str(body.get("deviceId", "")), device_id)
    seq = int(body.get("seq", 0))
    if seq <= 0:
        raise RejectedMessage(RejectReason.MALFORMED, "no seq")
    stamp = body.get("time")
    when = _parse_time(stamp) if stamp is not None else datetime.now(UTC)
    return IngestRecord(device_id=device_id, kind=kind, seq=seq, time=when, payload=body)


def _parse_time(stamp: str) -> datetime:
    """A record's RFC 3339 time (already shape-checked) as an aware UTC datetime; nanoseconds
    beyond the microsecond are dropped, as protobuf's own ToDatetime does."""
    try:
        return datetime.fromisoformat(stamp).astimezone(UTC)
    except (ValueError, OverflowError) as exc:
        raise RejectedMessage(RejectReason.MALFORMED, f"bad time: {exc}") from exc


def _device_of(topic: str, leaf: str) -> str:
    try:
        return device_of(topic, leaf)
    except TopicError as exc:
        raise RejectedMessage(RejectReason.BAD_TOPIC, str(exc)) from exc


def _check_device(claimed: str, device_id: str) -> None:
    if claimed != device_id:
        raise RejectedMessage(
            RejectReason.DEVICE_MISMATCH, f"message for device {claimed!r} published on {device_id!r}'s topic"
        )


def _time(message: Any, topic: str) -> datetime:
    try:
        when: datetime = message.time.ToDatetime(tzinfo=UTC)
    except (ValueError, OverflowError) as exc:
        raise RejectedMessage(RejectReason.MALFORMED, f"bad time on {topic}: {exc}") from exc
    return when


# the subscriber ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Inbound:
    """One received message in arrival order, still undecoded."""

    topic: str
    payload: bytes | bytearray
    arrived: datetime
    mid: int
    qos: int
    connection: int  # which connection it arrived on: a mid is only meaningful there


class _Counters:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.received = 0
        self.stored = 0
        self.rows = 0
        self.presence = 0
        self.status = 0
        self.write_failures = 0
        self.rejected: dict[RejectReason, int] = dict.fromkeys(RejectReason, 0)

    def snapshot(self) -> IngestStats:
        with self.lock:
            return IngestStats(
                received=self.received,
                stored=self.stored,
                rows=self.rows,
                presence=self.presence,
                status=self.status,
                rejected=sum(self.rejected.values()),
                malformed=self.rejected[RejectReason.MALFORMED],
                device_mismatch=self.rejected[RejectReason.DEVICE_MISMATCH],
                bad_topic=self.rejected[RejectReason.BAD_TOPIC],
                write_failures=self.write_failures,
            )


@dataclass
class _Split:
    """A batch of inbound messages sorted by what they carry, for one database transaction."""

    records: list[IngestRecord]
    presence: list[PresenceUpdate]
    statuses: list[StatusUpdate]
    messages: int  # telemetry messages among them

    @classmethod
    def of(cls, items: list[Decoded | None]) -> _Split:
        split = cls([], [], [], 0)
        for item in items:
            if isinstance(item, TelemetryBatch):
                split.records.extend(item.records)
                split.messages += 1
            elif isinstance(item, PresenceUpdate):
                split.presence.append(item)
            elif isinstance(item, StatusUpdate):
                split.statuses.append(item)
        return split

    def __bool__(self) -> bool:
        return bool(self.records or self.presence or self.statuses)


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
        self._engine = engine
        self._address: BrokerAddress = parse_broker_url(broker_url)
        if retiring and not self._address.v5:
            raise ValueError("retiring a replica needs an MQTT v5 broker (no shared subscriptions on 3.1.1)")
        self._client_id = client_id
        self._batch_size = batch_size
        self._flush_interval = flush_interval
        self._keepalive_s = keepalive_s
        self._session_expiry_s = session_expiry_s
        self._tls_context = tls_context
        # Bounded: Mosquitto 2.0.11 stops honouring Receive Maximum once acknowledgements flow
        # and pushes a whole backlog at us (17,000 unacknowledged messages seen). A full queue
        # blocks the network thread, which stops reading the socket, and TCP holds the rest in
        # the broker, where it is safe: memory stays bounded after any outage.
        self._max_pending = 2 * batch_size  # one batch being written, the next one arriving
        self._queue: queue.Queue[_Inbound] = queue.Queue(maxsize=self._max_pending)
        self._counters = _Counters()
        self._stopping = threading.Event()
        self._connected = threading.Event()
        self._subscribed = threading.Event()
        self._retiring = retiring
        self._unqueued = 0  # messages the network thread gave up queueing because we were stopping
        self._connection = 0
        self._client: mqtt.Client | None = None
        self._writer: threading.Thread | None = None

    # counters --------------------------------------------------------------------------------

    def stats(self) -> IngestStats:
        return self._counters.snapshot()

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
        """Starts connecting in the background and the writer thread; returns immediately."""
        if self._client is not None:
            raise RuntimeError("ingestor already started")
        self._stopping.clear()
        self._writer = threading.Thread(target=self._run_writer, name="telemetry-writer", daemon=True)
        self._writer.start()
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
        logger.info("telemetry ingestor %s started towards %s", self._client_id, self._address.url)

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
        written = written and self._queue.empty() and self._unqueued == 0
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
        if not self._stopping.is_set():
            logger.warning("ingestor lost the broker (%s); paho reconnects with backoff", reason_code)

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        """Only queues the message: decoding happens on the writer thread. Work done here holds
        the GIL whenever SQLite, on the writer thread, lets go of it for a moment (once per row
        inserted), and the writer would then wait up to the interpreter's switch interval for
        it back, each time: decoding here made a 5,000-row insert take seconds instead of 0.2 s."""
        inbound = _Inbound(
            topic=message.topic,
            payload=message.payload,
            arrived=datetime.now(UTC),
            mid=message.mid,
            qos=message.qos,
            connection=self._connection,
        )
        with self._counters.lock:
            self._counters.received += 1
        while not self._stopping.is_set():
            try:
                self._queue.put(inbound, timeout=self._flush_interval)
                return
            except queue.Full:
                continue  # the writer is behind (or the database down): wait for room
        with self._counters.lock:
            self._unqueued += 1  # left unacknowledged: the broker redelivers it to this session

    def _decoded(self, inbound: _Inbound) -> Decoded | None:
        """The message decoded, or None (counted and logged) when it is rejected."""
        try:
            return decode(inbound.topic, inbound.payload, arrived=inbound.arrived)
        except RejectedMessage as exc:
            self._count_rejected(exc.reason)
            logger.warning("rejected telemetry (%s): %s", exc.reason.value, exc)
        except Exception:  # a bug here must not stop ingestion
            self._count_rejected(RejectReason.MALFORMED)
            logger.exception("could not decode telemetry message %d on %s", inbound.mid, inbound.topic)
        return None

    def _count_rejected(self, reason: RejectReason) -> None:
        with self._counters.lock:
            self._counters.rejected[reason] += 1

    # writer thread ---------------------------------------------------------------------------

    def _run_writer(self) -> None:
        while not self._stopping.is_set():
            batch = self._next_batch(wait=self._flush_interval)
            if batch:
                self._write(batch, retry=True)
        # One last pass over what had arrived when stop() was called, so a clean stop leaves
        # little to redeliver; bounded by that count, since messages keep coming until we disconnect.
        left = self._queue.qsize()
        while left > 0:
            batch = self._next_batch(wait=0.0, limit=left)
            if not batch or not self._write(batch, retry=False):
                return
            left -= len(batch)

    def _next_batch(self, *, wait: float, limit: int | None = None) -> list[_Inbound]:
        size = self._batch_size if limit is None else min(limit, self._batch_size)
        try:
            first = self._queue.get(timeout=wait) if wait > 0 else self._queue.get_nowait()
        except queue.Empty:
            return []
        batch = [first]
        while len(batch) < size:
            try:
                batch.append(self._queue.get_nowait())
            except queue.Empty:
                break
        return batch

    def _write(self, batch: list[_Inbound], *, retry: bool) -> bool:
        """Stores and acknowledges a batch; False if the database refused it (left unacked)."""
        split = _Split.of([self._decoded(inbound) for inbound in batch])
        if split:
            try:
                if retry:
                    self._store_with_retry(split)
                else:
                    self._store(split)
            except SQLAlchemyError:
                with self._counters.lock:
                    self._counters.write_failures += 1
                logger.exception(
                    "leaving %d telemetry messages unacknowledged; the broker resends them", len(batch)
                )
                return False
            with self._counters.lock:
                self._counters.stored += split.messages
                self._counters.rows += len(split.records)
                self._counters.presence += len(split.presence)
                self._counters.status += len(split.statuses)
        self._ack(batch)
        return True

    def _store(self, split: _Split) -> None:
        store_batch(self._engine, records=split.records, presence=split.presence, statuses=split.statuses)

    def _store_with_retry(self, split: _Split) -> None:
        """Retries a failing database with jittered backoff until it works or we are stopping."""

        def log_retry(state: RetryCallState) -> None:
            with self._counters.lock:
                self._counters.write_failures += 1
            exc = state.outcome.exception() if state.outcome is not None else None
            logger.warning("telemetry write failed (attempt %d): %s; retrying", state.attempt_number, exc)

        for attempt in Retrying(
            retry=retry_if_exception_type(SQLAlchemyError),
            wait=wait_exponential(multiplier=0.1, max=10.0) + wait_random(0, 0.5),
            stop=stop_when_event_set(self._stopping),
            sleep=sleep_using_event(self._stopping),
            before_sleep=log_retry,
            reraise=True,
        ):
            with attempt:
                self._store(split)

    def _ack(self, batch: list[_Inbound]) -> None:
        """PUBACKs in arrival order, as MQTT asks; skips mids from an older connection."""
        client = self._client
        if client is None or not self._connected.is_set():
            return
        current = self._connection
        for item in batch:
            if item.qos > 0 and item.connection == current:
                client.ack(item.mid, item.qos)
