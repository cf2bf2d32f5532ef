"""A zero-setup MQTT broker inside the control plane process, for the demo and tests only.

Production runs Mosquitto (``deploy/mosquitto.conf`` with its ACL, which confines each device
to ``fleet/v1/devices/<its id>/#``) or EMQX; this one exists so ``fleetctl serve`` works on a
laptop with nothing else installed. It is amqtt (pure Python, MQTT 3.1.1) running on its own
thread and event loop, so its work never delays the gRPC server's loop and vice versa.

Two deliberate deviations from amqtt's defaults:
- Only loopback clients are admitted, without credentials. amqtt's stock anonymous plugin marks
  such sessions anonymous, and amqtt then neither keeps their subscriptions nor queues QoS 1
  messages for them while they are offline, which would defeat the ingestor's persistent session.
- No $SYS or packet/event logging plugins: they publish or log on every packet and add nothing
  for a local broker.

The listening socket is ours (``asyncio.start_server`` on port 0 when no port is given) and
hands each connection to ``Broker.stream_connected``; amqtt's "external" listener type exists
for exactly that. Binding it ourselves lets the OS pick the port without a probe-then-bind race.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import threading
from concurrent.futures import Future
from dataclasses import dataclass
from functools import partial
from typing import Any

from amqtt.broker import Broker
from amqtt.plugins.base import BaseAuthPlugin
from amqtt.session import Session
from paho.mqtt.enums import MQTTProtocolVersion

from protos.fleet.broker_url import BrokerAddress

logger = logging.getLogger(__name__)

_LISTENER = "default"


class BrokerStartError(RuntimeError):
    """The embedded broker could not start (port taken, bad address, amqtt failure)."""


class LoopbackAuthPlugin(BaseAuthPlugin):  # type: ignore[misc]  # amqtt ships no type hints
    """Admits clients that connect from a loopback address and no one else.

    Sessions are not marked anonymous, so persistent sessions (clean_session=False) keep their
    subscriptions and queued QoS 1 messages across reconnects, as MQTT 3.1.1 requires.
    """

    @dataclass
    class Config:
        """No options: the rule is fixed."""

    async def authenticate(self, *, session: Session) -> bool | None:
        address = session.remote_address
        try:
            allowed = address is not None and ipaddress.ip_address(address.split("%")[0]).is_loopback
        except ValueError:
            allowed = False
        if not allowed:
            self.context.logger.warning("refusing MQTT client %s from %s", session.client_id, address)
        return allowed


def _broker_config() -> dict[str, Any]:
    return {
        "listeners": {_LISTENER: {"type": "external"}},
        "plugins": {f"{LoopbackAuthPlugin.__module__}.{LoopbackAuthPlugin.__qualname__}": {}},
    }


class EmbeddedBroker:
    """amqtt on a private thread; ``start()`` returns the URL clients should use."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        """``host`` must be a loopback address: this broker admits loopback clients only."""
        try:
            loopback = ipaddress.ip_address(host).is_loopback
        except ValueError:
            loopback = host == "localhost"
        if not loopback:
            raise ValueError(f"the embedded broker listens on loopback only, not {host!r}; use Mosquitto")
        self._host = host
        self._port = port
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._broker: Broker | None = None
        self._server: asyncio.Server | None = None
        self._url: str | None = None

    @property
    def url(self) -> str:
        if self._url is None:
            raise RuntimeError("embedded broker is not running")
        return self._url

    def start(self, timeout: float = 10.0) -> str:
        """Starts the broker and returns its URL (``mqtt://host:port?protocol=3.1.1``) once it
        accepts connections."""
        if self._thread is not None:
            raise RuntimeError("embedded broker already started")
        loop = asyncio.new_event_loop()
        started: Future[int] = Future()
        thread = threading.Thread(target=self._run, args=(loop, started), name="embedded-mqtt", daemon=True)
        self._loop, self._thread = loop, thread
        thread.start()
        try:
            port = started.result(timeout)
        except Exception as exc:
            self._join(timeout)
            raise BrokerStartError(f"embedded MQTT broker did not start on {self._host}: {exc}") from exc
        # The socket is listening once start_server has returned: connections queue in its backlog.
        # amqtt speaks MQTT 3.1.1 only, which the URL says (?protocol=3.1.1).
        self._url = BrokerAddress(host=self._host, port=port, protocol=MQTTProtocolVersion.MQTTv311).url
        logger.info("embedded MQTT broker listening on %s", self._url)
        return self._url

    def stop(self, timeout: float = 10.0) -> None:
        """Shuts the broker down, closing client connections; safe to call twice."""
        loop = self._loop
        if loop is None or self._thread is None:
            return
        if loop.is_running():
            future = asyncio.run_coroutine_threadsafe(self._shutdown(), loop)
            try:
                future.result(timeout)
            except Exception:
                logger.exception("embedded MQTT broker did not shut down cleanly")
            loop.call_soon_threadsafe(loop.stop)
        self._join(timeout)
        self._url = None

    def __enter__(self) -> EmbeddedBroker:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # broker thread ---------------------------------------------------------------------------

    def _run(self, loop: asyncio.AbstractEventLoop, started: Future[int]) -> None:
        asyncio.set_event_loop(loop)
        try:
            port = loop.run_until_complete(self._start_broker(loop))
        except BaseException as exc:
            started.set_exception(exc)
            loop.close()
            return
        started.set_result(port)
        try:
            loop.run_forever()
        finally:
            pending = asyncio.all_tasks(loop)
            for task in pending:
                task.cancel()
            if pending:
                loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    async def _start_broker(self, loop: asyncio.AbstractEventLoop) -> int:
        broker = Broker(_broker_config(), loop=loop)
        await broker.start()
        self._broker = broker
        server = await asyncio.start_server(
            partial(broker.stream_connected, listener_name=_LISTENER), self._host, self._port
        )
        self._server = server
        return int(server.sockets[0].getsockname()[1])

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
        if self._broker is not None:
            await self._broker.shutdown()
        if self._server is not None:
            await self._server.wait_closed()
        self._server = None
        self._broker = None

    def _join(self, timeout: float) -> None:
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                logger.warning("embedded MQTT broker thread did not exit within %.1f s", timeout)
        self._thread = None
        self._loop = None
