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
``fleetctl retire-replica`` (`retire`), which stores what its session holds and ends
it; otherwise its share waits there until the session expires and is then dropped. Mosquitto
2.0.11 does not restore shared subscriptions from its persistence file: after a broker restart nothing matches
until the replicas subscribe again, and the agents, told so by the v5 PUBACK (no matching
subscribers), keep those records in their outboxes meanwhile. On an MQTT 3.1.1 broker
(``?protocol=3.1.1``, the embedded demo broker) there are no shared subscriptions: one replica.

Record streams carry JSON arrays of records (protos/fleet/v1/telemetry.proto); Presence and
DeviceStatus are single retained objects. paho's network thread only queues what arrives; the
writer thread decodes (edgefleet.controlplane.telemetry.record_shape) and stores. Writes use group commit: the
writer takes everything that queued up while the previous write ran (up to ``batch_size``
messages), so a burst becomes a few large inserts and a trickle is written immediately. No
message waits for a timer; ``flush_interval`` is only how often an idle writer looks up to see
whether it should stop. The queue holds at most two batches: when it is full the network thread
waits, stops reading the socket, and the backlog stays in the broker.

Nothing a device sends can stop ingestion. Every message is held to what the database can
store before it is written (``record_shape``: integer ranges, finite numbers, string, map and
list sizes; here: payload bytes, records per message, seq within BIGINT, a record time more
than ``MAX_CLOCK_SKEW`` ahead of its arrival clamped to the arrival). A message refused by
those checks (malformed, oversized, an unknown topic, another device's id) or one the database
still refuses is acknowledged, counted by reason, logged and kept in the dead-letter table
(``TelemetryDeadLetter``: reason, detail, size, sha256 and at most ``EXCERPT_BYTES`` of the
payload). A batch the database refuses is split in halves until the message at fault is found,
so the rest of the batch is stored. Only a database that cannot be reached (OperationalError
and the like) leaves a batch unacknowledged and retried; the stall shows in ``stalled_seconds``
(health, metrics). An unexpected error on the writer thread is logged and counted, the batch in
hand dead-lettered, and the writer carries on.

Memory is bounded by bytes as well as messages: a payload longer than ``MAX_MESSAGE_BYTES``
(Mosquitto's ``max_packet_size`` in deploy/mosquitto) is cut to its excerpt as soon as it
arrives, and the queue holds at most ``MAX_QUEUED_BYTES`` of payloads.
"""

from __future__ import annotations

import enum
import hashlib
import logging
import queue
import ssl
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from types import MappingProxyType
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
from sqlalchemy.exc import DisconnectionError, InterfaceError, OperationalError, SQLAlchemyError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception_type,
    sleep_using_event,
    stop_when_event_set,
    wait_exponential,
    wait_random,
)

from edgefleet.controlplane.store.telemetry import (
    DeadLetter,
    IngestRecord,
    PresenceUpdate,
    StatusUpdate,
    store_batch,
    store_dead_letters,
)
from edgefleet.controlplane.telemetry.record_shape import INT64_MAX, BadShape, ShapeProblem, decode_records
from edgefleet.protos.fleet.broker_url import BrokerAddress, configure_client, parse_broker_url
from edgefleet.protos.fleet.topics import (
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
from edgefleet.protos.fleet.v1 import telemetry_pb2

logger = logging.getLogger(__name__)

SESSION_EXPIRY_S = 14 * 24 * 3600  # as long as Mosquitto keeps a persistent session (deploy/)
CLIENT_ID_PREFIX = "edgefleet-controlplane-"
MAX_MESSAGE_BYTES = 256 * 1024
"""Longest payload stored: deploy/mosquitto's ``max_packet_size`` (and the embedded broker's)."""
MAX_QUEUED_BYTES = 32 * 1024 * 1024
"""Payload bytes waiting for the writer at most; beyond it the network thread waits."""
MAX_BATCH_BYTES = 4 * 1024 * 1024
"""Payload bytes decoded and written in one transaction at most (the agent's 10-record
messages, ~3 KiB, reach the 500-message batch size first)."""
EXCERPT_BYTES = 512
"""What the dead-letter table keeps of a refused payload."""
MAX_CLOCK_SKEW = timedelta(minutes=5)
"""A record stamped further ahead of its arrival than this is stored at its arrival time."""
DEVICE_ID_MAX_CHARS = 64  # Device.id and TelemetryRecord.device_id are VARCHAR(64)


def replica_client_id(replica: str) -> str:
    """The MQTT client id of one control-plane replica: one persistent session each."""
    if not replica or not replica.isprintable() or any(c.isspace() for c in replica) or len(replica) > 200:
        raise ValueError(f"replica id {replica!r}: need 1 to 200 printable characters without spaces")
    return CLIENT_ID_PREFIX + replica


class RejectReason(enum.Enum):
    """Why a received message was not stored (it is in the dead-letter table under this name)."""

    BAD_TOPIC = "bad_topic"
    MALFORMED = "malformed"
    DEVICE_MISMATCH = "device_mismatch"
    OVERSIZED = "oversized"  # payload longer than MAX_MESSAGE_BYTES: refused before decoding
    TOO_MANY_RECORDS = "too_many_records"
    RECORD_TOO_LARGE = "record_too_large"
    OUT_OF_RANGE = "out_of_range"  # a well-formed number beyond its field's range: detail names it
    STORE_FAILED = "store_failed"  # the database refused it, alone
    INTERNAL_ERROR = "internal_error"  # the writer failed unexpectedly on its batch


_SHAPE_REASONS = {
    ShapeProblem.MALFORMED: RejectReason.MALFORMED,
    ShapeProblem.OUT_OF_RANGE: RejectReason.OUT_OF_RANGE,
    ShapeProblem.TOO_MANY_RECORDS: RejectReason.TOO_MANY_RECORDS,
    ShapeProblem.RECORD_TOO_LARGE: RejectReason.RECORD_TOO_LARGE,
}


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
    oversized: int = 0
    too_many_records: int = 0
    record_too_large: int = 0
    out_of_range: int = 0
    store_failed: int = 0
    internal_error: int = 0
    write_failures: int = 0
    writer_errors: int = 0  # unexpected errors the writer survived
    clamped_times: int = 0  # records stamped too far ahead, stored at their arrival time
    dead_letter_failures: int = 0  # dead letters the database refused (acknowledged anyway)
    sessions_lost: int = 0  # reconnects that found the broker no longer held our session
    disconnects: int = 0  # connections to the broker lost (a client-id takeover included)
    dead_lettered_by_reason: Mapping[str, int] = field(default_factory=lambda: MappingProxyType({}))
    stalled_seconds: float = 0.0  # since the last successful write, while messages wait; else 0


@dataclass(frozen=True, slots=True)
class TelemetryBatch:
    """The records of one record-stream message, oldest first; ``clamped`` of them were stamped
    too far ahead and carry their arrival time instead."""

    records: tuple[IngestRecord, ...]
    clamped: int = 0


Decoded: TypeAlias = TelemetryBatch | PresenceUpdate | StatusUpdate


# decoding (pure, testable without a broker) ----------------------------------------------------


def decode(topic: str, payload: bytes | bytearray, *, arrived: datetime) -> Decoded | None:
    """Turns one MQTT message into something storable, or raises RejectedMessage. None: an
    empty presence or status payload, which only clears the retained message (nothing to store).
    ``arrived`` is when it was received."""
    if len(payload) > MAX_MESSAGE_BYTES:
        raise RejectedMessage(
            RejectReason.OVERSIZED, f"{len(payload)} bytes on {topic}, more than {MAX_MESSAGE_BYTES}"
        )
    if topic.endswith("/" + PRESENCE):
        return decode_presence(topic, payload, arrived=arrived) if payload else None
    if topic.endswith("/" + STATUS):
        return decode_status(topic, payload, arrived=arrived) if payload else None
    return decode_message(topic, payload, arrived=arrived)


def decode_message(
    topic: str, payload: bytes | bytearray, *, arrived: datetime | None = None
) -> TelemetryBatch:
    """Decodes a record-stream message: a non-empty JSON array of records of the topic's kind.

    One malformed element, or one claiming another device, rejects the whole message: a
    device's own agent never sends such a thing, so none of it can be trusted. The stored
    payload is each record's known fields as the agent wrote them (lowerCamelCase, each checked
    against the type protobuf's JSON mapping gives it by ``record_shape``); unknown fields,
    from a newer schema, are dropped. A record time more than MAX_CLOCK_SKEW after ``arrived``
    (default: now) is replaced by ``arrived``: a clock running ahead must not put rows in the
    future, where they would outlive retention and pin the device's last-seen time.
    """
    try:
        parsed = parse_telemetry_topic(topic)
    except TopicError as exc:
        raise RejectedMessage(RejectReason.BAD_TOPIC, str(exc)) from exc
    _check_device_id_length(parsed.device_id)
    kind = parsed.kind.value
    try:
        elements = decode_records(MESSAGE_TYPES[parsed.kind].DESCRIPTOR, payload)
    except BadShape as exc:
        raise RejectedMessage(_SHAPE_REASONS[exc.problem], f"{kind} payload on {topic}: {exc}") from exc
    if not elements:
        raise RejectedMessage(RejectReason.MALFORMED, f"{kind} payload on {topic}: an empty array")
    now = arrived if arrived is not None else datetime.now(UTC)
    latest = now + MAX_CLOCK_SKEW
    records = []
    clamped = 0
    for index, body in enumerate(elements):  # runs for every record the fleet sends: kept lean
        try:
            record = _record(kind, parsed.device_id, body, now)
        except RejectedMessage as exc:
            raise RejectedMessage(exc.reason, f"{kind} record {index} on {topic}: {exc}") from exc
        if record.time > latest:
            record = IngestRecord(record.device_id, record.kind, record.seq, now, record.payload)
            clamped += 1
        records.append(record)
    return TelemetryBatch(tuple(records), clamped)


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


def _record(kind: str, device_id: str, body: dict[str, Any], arrived: datetime) -> IngestRecord:
    """One record, already checked against its message type, with its identity fields parsed
    strictly."""
    _check_device(str(body.get("deviceId", "")), device_id)
    seq = int(body.get("seq", 0))
    if seq <= 0:
        raise RejectedMessage(RejectReason.MALFORMED, "no seq")
    if seq > INT64_MAX:  # record_shape bounds uint64 already; the column is what matters here
        raise RejectedMessage(RejectReason.OUT_OF_RANGE, f"seq {seq} does not fit a signed 64-bit integer")
    stamp = body.get("time")
    when = _parse_time(stamp) if stamp is not None else arrived
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
        device_id = device_of(topic, leaf)
    except TopicError as exc:
        raise RejectedMessage(RejectReason.BAD_TOPIC, str(exc)) from exc
    return _check_device_id_length(device_id)


def _check_device_id_length(device_id: str) -> str:
    if len(device_id) > DEVICE_ID_MAX_CHARS:
        raise RejectedMessage(
            RejectReason.BAD_TOPIC,
            f"a device id of {len(device_id)} characters, more than {DEVICE_ID_MAX_CHARS}",
        )
    return device_id


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
    """One received message in arrival order, still undecoded. An oversized payload is kept
    only as its excerpt; ``size`` is what arrived."""

    topic: str
    payload: bytes | bytearray
    arrived: datetime
    mid: int
    qos: int
    connection: int  # which connection it arrived on: a mid is only meaningful there
    size: int


class _Counters:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.received = 0
        self.stored = 0
        self.rows = 0
        self.presence = 0
        self.status = 0
        self.write_failures = 0
        self.writer_errors = 0
        self.clamped_times = 0
        self.dead_letter_failures = 0
        self.sessions_lost = 0
        self.disconnects = 0
        self.rejected: dict[RejectReason, int] = dict.fromkeys(RejectReason, 0)
        self.dead_lettered: dict[RejectReason, int] = dict.fromkeys(RejectReason, 0)

    def snapshot(self, stalled_seconds: float) -> IngestStats:
        with self.lock:
            by_reason = {reason.value: count for reason, count in self.rejected.items()}
            return IngestStats(
                received=self.received,
                stored=self.stored,
                rows=self.rows,
                presence=self.presence,
                status=self.status,
                rejected=sum(self.rejected.values()),
                write_failures=self.write_failures,
                writer_errors=self.writer_errors,
                clamped_times=self.clamped_times,
                dead_letter_failures=self.dead_letter_failures,
                sessions_lost=self.sessions_lost,
                disconnects=self.disconnects,
                dead_lettered_by_reason=MappingProxyType(
                    {reason.value: count for reason, count in self.dead_lettered.items()}
                ),
                stalled_seconds=stalled_seconds,
                **by_reason,
            )


@dataclass
class _Split:
    """A batch of decoded messages sorted by what they carry, for one database transaction."""

    records: list[IngestRecord]
    presence: list[PresenceUpdate]
    statuses: list[StatusUpdate]
    messages: int  # telemetry messages among them
    clamped: int  # records among them whose time was clamped

    @classmethod
    def of(cls, items: list[Decoded]) -> _Split:
        split = cls([], [], [], 0, 0)
        for item in items:
            if isinstance(item, TelemetryBatch):
                split.records.extend(item.records)
                split.messages += 1
                split.clamped += item.clamped
            elif isinstance(item, PresenceUpdate):
                split.presence.append(item)
            elif isinstance(item, StatusUpdate):
                split.statuses.append(item)
        return split

    def __bool__(self) -> bool:
        return bool(self.records or self.presence or self.statuses)


_Storable: TypeAlias = tuple[_Inbound, Decoded]


def _unreachable(exc: BaseException) -> bool:
    """Whether a failed write says the database is out of reach (retry the batch later) rather
    than that it refused what was in the batch (find the message at fault)."""
    return isinstance(exc, OperationalError | InterfaceError | DisconnectionError | PoolTimeout) or bool(
        getattr(exc, "connection_invalidated", False)
    )


def dead_letter(inbound: _Inbound, reason: RejectReason, detail: str) -> DeadLetter:
    """The dead-letter row of a message: never its whole payload, only an excerpt."""
    device_id = ""
    parts = inbound.topic.split("/")
    if len(parts) > 3 and parts[:3] == ["fleet", "v1", "devices"]:
        device_id = parts[3]
    payload = bytes(inbound.payload[:EXCERPT_BYTES])
    return DeadLetter(
        received_at=inbound.arrived,
        topic=inbound.topic,
        device_id=device_id,
        reason=reason.value,
        detail=detail,
        payload_bytes=inbound.size,
        payload_sha256=hashlib.sha256(inbound.payload).hexdigest()
        if inbound.size <= MAX_MESSAGE_BYTES
        else "",
        excerpt=payload,
    )


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
        # Payload bytes queued: the network thread waits while a message would take it beyond
        # MAX_QUEUED_BYTES (unless the queue is empty), so a flood of large messages stays in
        # the broker, not here.
        self._room = threading.Condition()
        self._queued_bytes = 0
        # Stall tracking (monotonic seconds): when the writer took the batch it is working on
        # (None: it holds none), and when a write last succeeded.
        self._batch_taken: float | None = None
        self._last_write = time.monotonic()
        self._disconnected_at: float | None = time.monotonic()  # None while connected

    # counters --------------------------------------------------------------------------------

    def stats(self) -> IngestStats:
        return self._counters.snapshot(self.stalled_seconds())

    def stalled_seconds(self) -> float:
        """Seconds since the last successful write while messages wait for the writer (0 when
        none waits): grows while the database is out of reach or the writer is gone."""
        taken = self._batch_taken
        if taken is None and self._queue.empty():
            return 0.0
        since = max(taken if taken is not None else 0.0, self._last_write)
        return max(0.0, time.monotonic() - since)

    def disconnected_seconds(self) -> float:
        """Seconds since the ingestor lost (or has not yet made) its broker connection; 0 while
        connected."""
        since = self._disconnected_at
        return 0.0 if since is None else time.monotonic() - since

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
        """Starts connecting in the background and the writer thread; returns immediately."""
        if self._client is not None:
            raise RuntimeError("ingestor already started")
        self._stopping.clear()
        self._disconnected_at = time.monotonic()
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
        self._disconnected_at = None
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
        if self._disconnected_at is None:
            self._disconnected_at = time.monotonic()
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
        An oversized payload is cut to its excerpt at once: it is refused, and only that is kept."""
        payload = message.payload
        size = len(payload)
        if size > MAX_MESSAGE_BYTES:
            payload = bytes(payload[:EXCERPT_BYTES])
        inbound = _Inbound(
            topic=message.topic,
            payload=payload,
            arrived=datetime.now(UTC),
            mid=message.mid,
            qos=message.qos,
            connection=self._connection,
            size=size,
        )
        with self._counters.lock:
            self._counters.received += 1
        if not self._reserve(len(payload)):
            with self._counters.lock:
                self._unqueued += 1  # left unacknowledged: the broker redelivers it to this session
            return
        while not self._stopping.is_set():
            try:
                self._queue.put(inbound, timeout=self._flush_interval)
                return
            except queue.Full:
                continue  # the writer is behind (or the database down): wait for room
        self._release(len(payload))
        with self._counters.lock:
            self._unqueued += 1  # left unacknowledged: the broker redelivers it to this session

    def _reserve(self, size: int) -> bool:
        """Waits until ``size`` more payload bytes fit the queue's budget; False if stopping."""
        with self._room:
            while self._queued_bytes > 0 and self._queued_bytes + size > MAX_QUEUED_BYTES:
                if self._stopping.is_set():
                    return False
                self._room.wait(self._flush_interval)
            self._queued_bytes += size
            return True

    def _release(self, size: int) -> None:
        with self._room:
            self._queued_bytes -= size
            self._room.notify_all()

    def _decoded(self, inbound: _Inbound) -> Decoded | None:
        """The message decoded; None for an empty retained payload. RejectedMessage when it
        cannot be stored; any other exception is a bug, reported as INTERNAL_ERROR."""
        if inbound.size > MAX_MESSAGE_BYTES:
            raise RejectedMessage(
                RejectReason.OVERSIZED,
                f"{inbound.size} bytes on {inbound.topic[:200]}, more than {MAX_MESSAGE_BYTES}",
            )
        try:
            return decode(inbound.topic, inbound.payload, arrived=inbound.arrived)
        except RejectedMessage:
            raise
        except Exception as exc:  # a bug here must not stop ingestion
            logger.exception("could not decode telemetry message %d on %s", inbound.mid, inbound.topic[:200])
            raise RejectedMessage(RejectReason.INTERNAL_ERROR, f"decoding failed: {exc!r}") from exc

    # writer thread ---------------------------------------------------------------------------

    def _run_writer(self) -> None:
        """The writer loop, supervised: an unexpected error is logged and counted and the loop
        carries on (a bug must not end ingestion for every device)."""
        while not self._stopping.is_set():
            try:
                batch = self._next_batch(wait=self._flush_interval)
                if batch:
                    self._write_supervised(batch, retry=True)
            except Exception:
                self._count_writer_error()
                logger.exception("telemetry writer failed; carrying on")
                self._stopping.wait(self._flush_interval)
        # One last pass over what had arrived when stop() was called, so a clean stop leaves
        # little to redeliver; bounded by that count, since messages keep coming until we disconnect.
        left = self._queue.qsize()
        while left > 0:
            batch = self._next_batch(wait=0.0, limit=left)
            if not batch or not self._write_supervised(batch, retry=False):
                return
            left -= len(batch)

    def _count_writer_error(self) -> None:
        with self._counters.lock:
            self._counters.writer_errors += 1

    def _next_batch(self, *, wait: float, limit: int | None = None) -> list[_Inbound]:
        size = self._batch_size if limit is None else min(limit, self._batch_size)
        try:
            first = self._queue.get(timeout=wait) if wait > 0 else self._queue.get_nowait()
        except queue.Empty:
            return []
        batch = [first]
        taken = len(first.payload)
        # Bytes bound a batch too: decoded, a payload takes several times its size in objects.
        while len(batch) < size and taken < MAX_BATCH_BYTES:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            batch.append(item)
            taken += len(item.payload)
        return batch

    def _write_supervised(self, batch: list[_Inbound], *, retry: bool) -> bool:
        """``_write``, and if it fails unexpectedly, the batch dead-lettered and acknowledged
        so the broker does not hand it to us again and again."""
        self._batch_taken = time.monotonic()
        try:
            return self._write(batch, retry=retry)
        except Exception as exc:
            self._count_writer_error()
            with self._counters.lock:
                self._counters.rejected[RejectReason.INTERNAL_ERROR] += len(batch)
            logger.exception("telemetry writer failed on %d messages; dead-lettering them", len(batch))
            letters = [dead_letter(item, RejectReason.INTERNAL_ERROR, repr(exc)) for item in batch]
            try:
                self._keep_dead_letters(letters)
            except Exception:
                logger.exception("could not keep %d dead letters", len(letters))
            self._ack(batch)
            return True
        finally:
            self._batch_taken = None
            self._release(sum(len(item.payload) for item in batch))

    def _write(self, batch: list[_Inbound], *, retry: bool) -> bool:
        """Stores and acknowledges a batch; False if the database could not be reached (left
        unacknowledged). Messages refused on their own go to the dead-letter table."""
        storable: list[_Storable] = []
        letters: list[DeadLetter] = []
        for inbound in batch:
            try:
                decoded = self._decoded(inbound)
            except RejectedMessage as exc:
                self._reject(inbound, exc.reason, str(exc), letters)
                continue
            if decoded is not None:
                storable.append((inbound, decoded))
        try:
            if retry:
                self._with_retry(lambda: self._store_isolating(storable, letters))
            else:
                self._store_isolating(storable, letters)
        except SQLAlchemyError:
            with self._counters.lock:
                self._counters.write_failures += 1
            logger.exception(
                "leaving %d telemetry messages unacknowledged; the broker resends them", len(batch)
            )
            return False
        self._last_write = time.monotonic()
        self._ack(batch)
        return True

    def _reject(
        self, inbound: _Inbound, reason: RejectReason, detail: str, letters: list[DeadLetter]
    ) -> None:
        with self._counters.lock:
            self._counters.rejected[reason] += 1
        logger.warning("rejected telemetry (%s): %s", reason.value, detail[:1000])
        letters.append(dead_letter(inbound, reason, detail))

    def _store_isolating(self, storable: list[_Storable], letters: list[DeadLetter]) -> None:
        """Stores what decoded, finds the messages the database refuses (dead-lettered with
        the rest of the refused ones), and keeps the dead letters. Raises only when the
        database is out of reach, so the caller retries the whole batch."""
        refused = list(letters)
        for inbound, exc in self._store_or_split(storable):
            self._reject(inbound, RejectReason.STORE_FAILED, f"{type(exc).__name__}: {exc}", refused)
        self._keep_dead_letters(refused)

    def _store_or_split(self, storable: list[_Storable]) -> list[tuple[_Inbound, Exception]]:
        """Stores ``storable`` in one transaction, or if the database refuses it, each half
        in turn, down to the single messages at fault, which are returned. Only the database's
        refusals (SQLAlchemyError) are isolated: any other exception is a bug, raised to
        ``_write_supervised``, which dead-letters the whole batch as INTERNAL_ERROR."""
        if not storable:
            return []
        split = _Split.of([decoded for _, decoded in storable])
        try:
            self._store(split)
        except SQLAlchemyError as exc:
            if _unreachable(exc):
                raise
            if len(storable) == 1:
                logger.warning(
                    "the database refused a telemetry message on %s: %s", storable[0][0].topic, exc
                )
                return [(storable[0][0], exc)]
            middle = len(storable) // 2
            return self._store_or_split(storable[:middle]) + self._store_or_split(storable[middle:])
        with self._counters.lock:
            self._counters.stored += split.messages
            self._counters.rows += len(split.records)
            self._counters.presence += len(split.presence)
            self._counters.status += len(split.statuses)
            self._counters.clamped_times += split.clamped
        return []

    def _keep_dead_letters(self, letters: list[DeadLetter]) -> None:
        """Writes dead letters; one the database refuses anyway is logged, counted and given up
        (it is acknowledged all the same: it must never block the rest)."""
        if not letters:
            return
        try:
            store_dead_letters(self._engine, letters)
        except Exception as exc:
            if _unreachable(exc):
                raise
            with self._counters.lock:
                self._counters.dead_letter_failures += len(letters)
            logger.exception("the database refused %d dead letters; dropping them", len(letters))
            return
        with self._counters.lock:
            for letter in letters:
                self._counters.dead_lettered[RejectReason(letter.reason)] += 1

    def _store(self, split: _Split) -> None:
        if split:
            store_batch(self._engine, records=split.records, presence=split.presence, statuses=split.statuses)

    def _with_retry(self, write: Any) -> None:
        """Retries a database out of reach with jittered backoff until it works or we are stopping."""

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
                write()

    def _ack(self, batch: list[_Inbound]) -> None:
        """PUBACKs in arrival order, as MQTT asks; skips mids from an older connection."""
        client = self._client
        if client is None or not self._connected.is_set():
            return
        current = self._connection
        for item in batch:
            if item.qos > 0 and item.connection == current:
                client.ack(item.mid, item.qos)
