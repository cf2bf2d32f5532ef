"""Simulated devices that hear of desired-state changes the way the agent does with
``--desired-via broker``: each holds its own MQTT connection, subscribed to its own desired
topic, and parses every notice with the agent's parser (agent/tasks/desired_notices.py).

Thousands of paho clients in one process cannot each have paho's network thread: they run on
the worker's asyncio loop instead, through paho's socket callbacks (``on_socket_open`` and
friends, as paho's examples/loop_asyncio.py does), so a worker holds 2,500 connections with one
thread. ``loop_misc`` (keepalive pings) runs for all clients from one task.

What a simulated device does NOT do here: reconnect after the broker goes away (the agent's
publisher does, with paho's backoff), or poll the control plane at start (the agent polls once
when subscribed: a burst that leaves no connection behind once the channel idles).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from edgefleet.agent.tasks.desired_notices import NoticeRefused, parse_notice
from edgefleet.protos.fleet.broker_url import BrokerAddress, parse_broker_url
from edgefleet.protos.fleet.topics import desired_topic
from edgefleet.protos.fleet.v1 import device_pb2

log = logging.getLogger(__name__)

KEEPALIVE_S = 120
MISC_EVERY_S = 5.0
CONNECT_CONCURRENCY = 64

OnNotice = Callable[[str, device_pb2.DesiredState], None]


class NoticeListener:
    """One device's MQTT connection, driven by the event loop, subscribed to its desired topic."""

    def __init__(
        self, device_id: str, address: BrokerAddress, loop: asyncio.AbstractEventLoop, on_notice: OnNotice
    ) -> None:
        self.device_id = device_id
        self.topic = desired_topic(device_id)
        self.refused = 0
        self._address = address
        self._loop = loop
        self._on_notice = on_notice
        self.subscribed: asyncio.Future[None] = loop.create_future()
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=device_id,
            protocol=address.protocol,
            reconnect_on_failure=False,
        )
        if address.username is not None:
            client.username_pw_set(address.username, address.password)
        client.on_socket_open = self._socket_open
        client.on_socket_close = self._socket_close
        client.on_socket_register_write = self._register_write
        client.on_socket_unregister_write = self._unregister_write
        client.on_connect = self._connected
        client.on_subscribe = self._granted
        client.on_message = self._message
        self.client = client

    def connect(self) -> None:
        """Blocking TCP connect (loopback: fast); CONNECT, SUBACK and the rest come on the loop."""
        if self._address.v5:
            self.client.connect(self._address.host, self._address.port, KEEPALIVE_S, clean_start=True)
        else:
            self.client.connect(self._address.host, self._address.port, KEEPALIVE_S)

    def close(self) -> None:
        self.client.disconnect()

    # paho's socket callbacks: the loop watches the socket instead of paho's thread ------------

    def _socket_open(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        self._loop.add_reader(sock, client.loop_read)

    def _socket_close(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        self._loop.remove_reader(sock)
        self._loop.remove_writer(sock)

    def _register_write(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        self._loop.add_writer(sock, client.loop_write)

    def _unregister_write(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        self._loop.remove_writer(sock)

    # MQTT callbacks (on the loop) ----------------------------------------------------------------

    def _connected(
        self,
        client: mqtt.Client,
        userdata: Any,
        flags: mqtt.ConnectFlags,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        if reason_code.is_failure:
            if not self.subscribed.done():
                self.subscribed.set_exception(
                    ConnectionError(f"{self.device_id}: broker refused: {reason_code}")
                )
            return
        client.subscribe(self.topic, qos=1)

    def _granted(
        self,
        client: mqtt.Client,
        userdata: Any,
        mid: int,
        reason_codes: list[ReasonCode],
        properties: Properties | None,
    ) -> None:
        if self.subscribed.done():
            return
        if any(code.is_failure for code in reason_codes):
            self.subscribed.set_exception(ConnectionError(f"{self.device_id}: subscription refused"))
        else:
            self.subscribed.set_result(None)

    def _message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        try:
            state = parse_notice(bytes(message.payload))
        except NoticeRefused as exc:
            self.refused += 1
            log.warning("%s: notice refused: %s", self.device_id, exc)
            return
        self._on_notice(self.device_id, state)


class NoticeListeners:
    """Every simulated device's listener in one worker, and the one keepalive task for all."""

    def __init__(self, broker_url: str, on_notice: OnNotice) -> None:
        self._address = parse_broker_url(broker_url)
        if self._address.tls:
            raise ValueError("simulated listeners speak plain MQTT (the benchmark's own broker)")
        self._on_notice = on_notice
        self._listeners: dict[str, NoticeListener] = {}
        self._misc: asyncio.Task[None] | None = None

    async def connect(self, device_ids: Iterable[str], within: float) -> None:
        """Connects and subscribes every device; returns once every SUBACK arrived."""
        loop = asyncio.get_running_loop()
        fresh = [NoticeListener(i, self._address, loop, self._on_notice) for i in device_ids]
        slots = asyncio.Semaphore(CONNECT_CONCURRENCY)

        async def one(listener: NoticeListener) -> None:
            async with slots:
                listener.connect()  # loopback TCP: returns at once
                self._listeners[listener.device_id] = listener
                await listener.subscribed

        if self._misc is None:
            self._misc = asyncio.create_task(self._keepalive(), name="mqtt-misc")
        await asyncio.wait_for(asyncio.gather(*(one(listener) for listener in fresh)), within)

    @property
    def refused(self) -> int:
        return sum(listener.refused for listener in self._listeners.values())

    async def _keepalive(self) -> None:
        while True:
            await asyncio.sleep(MISC_EVERY_S)
            for listener in list(self._listeners.values()):
                listener.client.loop_misc()

    async def close(self) -> None:
        if self._misc is not None:
            self._misc.cancel()
            self._misc = None
        for listener in self._listeners.values():
            try:
                listener.close()
            except OSError as exc:
                log.debug("closing %s: %s", listener.device_id, exc)
        self._listeners = {}
