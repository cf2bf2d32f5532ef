"""Telemetry ingestion: MQTT subscriber in, batched database writes out.

The chain device outbox → broker → here → database is at-least-once end to end:
- the subscription lives in a persistent broker session (fixed client id, clean_session=False),
  so QoS 1 messages published while the control plane is down wait in the broker;
- a message is acknowledged to the broker (manual PUBACK) only after the batch holding it is
  committed, so a crash between receiving and writing makes the broker redeliver it;
- redeliveries are harmless because the database ignores a repeated (device_id, seq).

Writes use group commit: the writer takes everything that queued up while the previous write
ran (up to ``batch_size``), so a burst becomes a few large inserts and a trickle is written
immediately. No message waits for a timer; ``flush_interval`` is only how often an idle writer
looks up to see whether it should stop.

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
from typing import Any

import paho.mqtt.client as mqtt
from google.protobuf import json_format
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
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

from controlplane.db.telemetry import IngestRecord, insert_telemetry
from protos.fleet.broker_url import BrokerAddress, configure_client, parse_broker_url
from protos.fleet.topics import (
    MESSAGE_TYPES,
    TopicError,
    parse_telemetry_topic,
    telemetry_subscription,
)

logger = logging.getLogger(__name__)


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
    """A snapshot of the ingestor's counters since start."""

    received: int = 0
    stored: int = 0
    rejected: int = 0
    malformed: int = 0
    device_mismatch: int = 0
    bad_topic: int = 0
    write_failures: int = 0


def decode_message(topic: str, payload: bytes | bytearray) -> IngestRecord:
    """Turns one MQTT message into a storable record, or raises RejectedMessage.

    Pure, so it can be tested without a broker. The stored payload is the message re-encoded
    with protobuf's JSON mapping: field names normalised to lowerCamelCase and unknown fields
    (from a newer schema) dropped, so queries see one shape per schema version.
    """
    try:
        parsed = parse_telemetry_topic(topic)
    except TopicError as exc:
        raise RejectedMessage(RejectReason.BAD_TOPIC, str(exc)) from exc
    message = MESSAGE_TYPES[parsed.kind]()
    try:
        json_format.Parse(payload.decode("utf-8"), message, ignore_unknown_fields=True)
    except (json_format.ParseError, UnicodeDecodeError, RecursionError) as exc:
        raise RejectedMessage(
            RejectReason.MALFORMED, f"{parsed.kind.value} payload on {topic}: {exc}"
        ) from exc
    if message.device_id != parsed.device_id:
        raise RejectedMessage(
            RejectReason.DEVICE_MISMATCH,
            f"message for device {message.device_id!r} published on {parsed.device_id!r}'s topic",
        )
    if message.seq <= 0:
        raise RejectedMessage(RejectReason.MALFORMED, f"{parsed.kind.value} payload on {topic}: no seq")
    if message.HasField("time"):
        try:
            when = message.time.ToDatetime(tzinfo=UTC)
        except (ValueError, OverflowError) as exc:
            raise RejectedMessage(RejectReason.MALFORMED, f"bad time on {topic}: {exc}") from exc
    else:
        when = datetime.now(UTC)
    body = json_format.MessageToDict(
        message, preserving_proto_field_name=False, always_print_fields_with_no_presence=True
    )
    return IngestRecord(
        device_id=parsed.device_id, kind=parsed.kind.value, seq=message.seq, time=when, payload=body
    )


@dataclass(frozen=True, slots=True)
class _Inbound:
    """One received message in arrival order; ``record`` is None for a rejected one (ack only)."""

    record: IngestRecord | None
    mid: int
    qos: int
    connection: int  # which connection it arrived on: a mid is only meaningful there


class _Counters:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.received = 0
        self.stored = 0
        self.write_failures = 0
        self.rejected: dict[RejectReason, int] = dict.fromkeys(RejectReason, 0)

    def snapshot(self) -> IngestStats:
        with self.lock:
            return IngestStats(
                received=self.received,
                stored=self.stored,
                rejected=sum(self.rejected.values()),
                malformed=self.rejected[RejectReason.MALFORMED],
                device_mismatch=self.rejected[RejectReason.DEVICE_MISMATCH],
                bad_topic=self.rejected[RejectReason.BAD_TOPIC],
                write_failures=self.write_failures,
            )


class TelemetryIngestor:
    """Subscribes to every device's telemetry and stores it; ``start()``/``stop()`` bracket it."""

    def __init__(
        self,
        *,
        engine: Engine,
        broker_url: str,
        client_id: str = "edgefleet-controlplane",
        batch_size: int = 500,
        flush_interval: float = 0.2,
        keepalive_s: int = 30,
        tls_context: ssl.SSLContext | None = None,
    ) -> None:
        """Raises BrokerUrlError for a bad URL; an unreachable broker is retried, not raised."""
        if batch_size < 1 or flush_interval <= 0:
            raise ValueError("batch_size must be >= 1 and flush_interval > 0")
        self._engine = engine
        self._address: BrokerAddress = parse_broker_url(broker_url)
        self._client_id = client_id
        self._batch_size = batch_size
        self._flush_interval = flush_interval
        self._keepalive_s = keepalive_s
        self._tls_context = tls_context
        self._queue: queue.SimpleQueue[_Inbound] = queue.SimpleQueue()
        self._counters = _Counters()
        self._stopping = threading.Event()
        self._connected = threading.Event()
        self._subscribed = threading.Event()
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
        """Records written (a duplicate the database ignored counts too)."""
        return self.stats().stored

    @property
    def rejected(self) -> int:
        return self.stats().rejected

    def wait_subscribed(self, timeout: float) -> bool:
        """True once the broker has confirmed the subscription within ``timeout`` seconds."""
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
        client.connect_async(self._address.host, self._address.port, keepalive=self._keepalive_s)
        client.loop_start()
        logger.info("telemetry ingestor %s started towards %s", self._client_id, self._address.url)

    def stop(self, timeout: float = 10.0) -> None:
        """Writes what has arrived, acknowledges it, then disconnects (keeping the session).

        Anything not written by then stays unacknowledged and the broker redelivers it to this
        client id on the next start.
        """
        self._stopping.set()
        if self._writer is not None:
            self._writer.join(timeout)
            if self._writer.is_alive():
                logger.warning("telemetry writer did not finish within %.1f s", timeout)
            self._writer = None
        client = self._client
        if client is not None:
            client.disconnect()
            client.loop_stop()
            self._client = None
        self._connected.clear()
        self._subscribed.clear()

    def _make_client(self) -> mqtt.Client:
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=self._client_id,
            clean_session=False,  # the broker queues QoS 1 telemetry for us while we are down
            protocol=MQTTProtocolVersion.MQTTv311,
            manual_ack=True,  # PUBACK only after the database commit
        )
        client.enable_logger(logging.getLogger("paho.ingest"))
        configure_client(client, self._address, self._tls_context)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_subscribe = self._on_subscribe
        client.on_message = self._on_message
        return client

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
        # Subscribing on every connect covers a broker that lost our session (restart without
        # persistence); with the session present it is a harmless repeat.
        client.subscribe(telemetry_subscription(), qos=1)
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
            logger.error("broker refused the telemetry subscription: %s", reason_codes)
            return
        self._subscribed.set()

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
        record: IngestRecord | None = None
        try:
            record = decode_message(message.topic, message.payload)
        except RejectedMessage as exc:
            self._count_rejected(exc.reason)
            logger.warning("rejected telemetry (%s): %s", exc.reason.value, exc)
        except Exception:  # a bug here must not take the network thread down
            self._count_rejected(RejectReason.MALFORMED)
            logger.exception("could not decode telemetry message %d", message.mid)
        with self._counters.lock:
            self._counters.received += 1
        self._queue.put(
            _Inbound(record=record, mid=message.mid, qos=message.qos, connection=self._connection)
        )

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
        records = [item.record for item in batch if item.record is not None]
        if records:
            try:
                if retry:
                    self._insert_with_retry(records)
                else:
                    insert_telemetry(self._engine, records=records)
            except SQLAlchemyError:
                with self._counters.lock:
                    self._counters.write_failures += 1
                logger.exception(
                    "dropping %d telemetry records unacknowledged; the broker resends them", len(records)
                )
                return False
            with self._counters.lock:
                self._counters.stored += len(records)
        self._ack(batch)
        return True

    def _insert_with_retry(self, records: list[IngestRecord]) -> None:
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
                insert_telemetry(self._engine, records=records)

    def _ack(self, batch: list[_Inbound]) -> None:
        """PUBACKs in arrival order, as MQTT 3.1.1 asks; skips mids from an older connection."""
        client = self._client
        if client is None or not self._connected.is_set():
            return
        current = self._connection
        for item in batch:
            if item.qos > 0 and item.connection == current:
                client.ack(item.mid, item.qos)
