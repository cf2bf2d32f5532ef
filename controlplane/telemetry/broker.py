"""A zero-setup MQTT broker inside the control plane process, for the demo and tests only.

Production runs Mosquitto (``deploy/mosquitto.conf`` with its ACL, which confines each device
to ``fleet/v1/devices/<its id>/#``) or EMQX; this one exists so ``fleetctl serve`` works on a
laptop with nothing else installed. It is amqtt (pure Python, MQTT 3.1.1) running on its own
thread and event loop, so its work never delays the gRPC server's loop and vice versa.

It admits clients the way deploy/mosquitto does, on two loopback listeners:
- the control listener (plain TCP, ``url``): only the user ``edgefleet-controlplane`` with the
  password this broker drew at start (in the URL the control plane's own clients use: the
  ingestor, and revocation, which ends a device's session by connecting with its client id).
  Such clients may use any client id and topic, like Mosquitto's listener 1.
- the device listener (TLS, ``device_url``, with ``device_tls``): only clients presenting a
  certificate the fleet CA issued, as the agent already does for Mosquitto's listener 8883. The
  certificate's CN is the device id; the client id must be that id and the session clean (the
  agent's are), and the device may publish, subscribe and receive only under its own
  ``fleet/v1/devices/<id>/`` (``DeviceTopicPlugin``). With ``DeviceTls.crl_path`` the
  certificate must also be absent from the CRL the control plane issues there
  (controlplane/trust/crl.py, revocation.py), read again whenever the file changes: a revoked device
  whose session revocation ended cannot come back with its still-unexpired certificate. With
  no usable CRL (missing, not the CA's, expired) no device is admitted, as with Mosquitto.
Everyone else (anonymous, a wrong password, another device's client id) is refused with a
CONNACK before amqtt sees the connection: amqtt ends an existing session with the same client
id while handling CONNECT, before asking its auth plugins, so a refused client could otherwise
still take over the ingestor's session. Every packet is limited to ``MAX_PACKET_BYTES`` (as
``max_packet_size`` in deploy/mosquitto): a client sending a larger one is disconnected before
its payload is read.

amqtt's own plugins: no $SYS or packet/event logging (they publish or log on every packet).
Sessions are not marked anonymous, so the ingestor's persistent session keeps its subscriptions
and queued QoS 1 messages across reconnects, as MQTT 3.1.1 requires.

The listening sockets are ours (``asyncio.start_server``, port 0 when none is given: the OS
picks a free one without a probe-then-bind race) and each admitted connection is handed to
``Broker.external_connected``; amqtt's "external" listener type exists for exactly that.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import logging
import secrets
import ssl
import tempfile
import threading
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from amqtt.adapters import ReaderAdapter, StreamWriterAdapter
from amqtt.broker import Broker
from amqtt.contexts import Action
from amqtt.mqtt.connack import BAD_USERNAME_PASSWORD, IDENTIFIER_REJECTED, NOT_AUTHORIZED, ConnackPacket
from amqtt.mqtt.connect import ConnectPacket
from amqtt.plugins.base import BaseAuthPlugin, BaseTopicPlugin
from amqtt.session import Session
from cryptography import x509
from cryptography.x509.oid import NameOID
from paho.mqtt.enums import MQTTProtocolVersion

from edgefleet.controlplane.trust.crl import CrlFile, CrlUnusable
from edgefleet.protos.fleet.broker_url import BrokerAddress
from edgefleet.protos.fleet.topics import device_prefix

logger = logging.getLogger(__name__)

_CONTROL = "default"  # amqtt requires a listener of this name
_DEVICES = "devices"
CONTROL_USER = "edgefleet-controlplane"
MAX_PACKET_BYTES = 256 * 1024  # deploy/mosquitto/mosquitto.conf: max_packet_size 262144
CONNECT_TIMEOUT_S = 10.0


class BrokerStartError(RuntimeError):
    """The embedded broker could not start (port taken, bad address, amqtt failure)."""


@dataclass(frozen=True)
class DeviceTls:
    """The device listener's TLS: the fleet CA (client certificates must chain to it), the
    broker's own certificate and key, PEM, and the CRL file revoked certificates are listed in
    (None: no revocation check, for tests of the broker alone)."""

    ca_pem: bytes
    cert_pem: bytes
    key_pem: bytes
    crl_path: Path | None = None


def _peer_certificate(ssl_object: Any) -> x509.Certificate | None:
    """The verified client certificate, None without one."""
    if ssl_object is None:
        return None
    der = ssl_object.getpeercert(binary_form=True)
    return x509.load_der_x509_certificate(der) if der else None


def _device_id(certificate: x509.Certificate | None) -> str | None:
    """A client certificate's CN (the device id), None without one."""
    if certificate is None:
        return None
    names = certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    value = names[0].value if names else None
    return value if isinstance(value, str) and value else None


def _peer_device_id(ssl_object: Any) -> str | None:
    """The CN of a verified client certificate, None without one."""
    return _device_id(_peer_certificate(ssl_object))


class AdmittedAuthPlugin(BaseAuthPlugin):  # type: ignore[misc]  # amqtt ships no type hints
    """Admits every connection amqtt is handed: the gate (``EmbeddedBroker._gate``) has already
    checked it, and refused ones never reach amqtt."""

    @dataclass
    class Config:
        """No options."""

    async def authenticate(self, *, session: Session) -> bool | None:
        return True


class DeviceTopicPlugin(BaseTopicPlugin):  # type: ignore[misc]
    """Confines a device (a session on the TLS listener) to its own topic subtree, in every
    direction, like deploy/mosquitto/acl's ``pattern write/read fleet/v1/devices/%u/#``. Sessions
    of the control listener (no TLS: admitted by password only) are not confined."""

    @dataclass
    class Config:
        """No options."""

    async def topic_filtering(
        self, *, session: Session | None = None, topic: str | None = None, action: Action | None = None
    ) -> bool | None:
        if session is None or topic is None:
            return False
        if session.ssl_object is None:
            return True
        device_id = _peer_device_id(session.ssl_object)
        if device_id is None or device_id != session.client_id:
            return False
        allowed = topic.startswith(device_prefix(device_id) + "/")
        if not allowed and action == Action.PUBLISH:
            self.context.logger.warning("device %s may not publish to %s", device_id, topic[:200])
        return allowed


class _Broker(Broker):  # type: ignore[misc]
    """amqtt's broker, except that a subscription the topic plugins refuse gets no retained
    messages either (amqtt 0.12 sends them for a refused filter too: a device subscribing to
    "#" would read every device's presence and status)."""

    async def _publish_retained_messages_for_subscription(
        self, subscription: tuple[str, int], session: Session
    ) -> None:
        if await self._topic_filtering(session, subscription[0], Action.SUBSCRIBE):
            await super()._publish_retained_messages_for_subscription(subscription, session)


def _broker_config() -> dict[str, Any]:
    plugins = [AdmittedAuthPlugin, DeviceTopicPlugin]
    return {
        "listeners": {_CONTROL: {"type": "external"}, _DEVICES: {"type": "external"}},
        "plugins": {f"{p.__module__}.{p.__qualname__}": {} for p in plugins},
    }


class _Reader(ReaderAdapter):  # type: ignore[misc]
    """Reads a connection for amqtt: first what the gate already read (the CONNECT), then the
    socket. A read beyond MAX_PACKET_BYTES (amqtt reads a packet's body in one call) ends the
    connection instead: nothing that large is ever buffered."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer
        self._replay = bytearray()
        self.recorded: bytearray | None = bytearray()  # while the gate reads the CONNECT

    async def read(self, n: int = -1) -> bytes:
        if n < 0 or n > MAX_PACKET_BYTES:
            logger.warning("embedded broker: closing %s, which sent a packet of %d bytes", self._peer(), n)
            self._writer.close()
            raise ConnectionResetError(f"a packet larger than {MAX_PACKET_BYTES} bytes")
        if self._replay:
            data = bytes(self._replay[:n])
            del self._replay[:n]
            if len(data) < n:
                data += await self._reader.readexactly(n - len(data))
            return data
        data = await self._reader.readexactly(n)
        if self.recorded is not None:
            self.recorded += data
        return data

    def _peer(self) -> Any:
        return self._writer.get_extra_info("peername")

    def replay(self) -> None:
        """From now on, hand out what was recorded first."""
        if self.recorded is not None:
            self._replay = self.recorded
            self.recorded = None

    def feed_eof(self) -> None:
        self._reader.feed_eof()


class EmbeddedBroker:
    """amqtt on a private thread; ``start()`` returns the URL the control plane's own clients
    use (with its password), ``device_url`` the one devices are told."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        device_tls: DeviceTls | None = None,
        device_port: int = 0,
    ) -> None:
        """``host`` must be a loopback address: this broker is for one machine. Without
        ``device_tls`` there is no device listener (tests that publish as the control plane)."""
        try:
            loopback = ipaddress.ip_address(host).is_loopback
        except ValueError:
            loopback = host == "localhost"
        if not loopback:
            raise ValueError(f"the embedded broker listens on loopback only, not {host!r}; use Mosquitto")
        self._host = host
        self._port = port
        self._device_tls = device_tls
        self._device_port = device_port
        self._crl: CrlFile | None = None  # read on the broker thread only
        if device_tls is not None and device_tls.crl_path is not None:
            issuer = x509.load_pem_x509_certificate(device_tls.ca_pem)
            self._crl = CrlFile(device_tls.crl_path, issuer)
        self._password = secrets.token_urlsafe(24)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._broker: Broker | None = None
        self._servers: list[asyncio.Server] = []
        self._open: dict[str, asyncio.StreamWriter] = {}  # client id -> its connection (broker thread)
        self._url: str | None = None
        self._device_url: str | None = None

    @property
    def url(self) -> str:
        """The control listener's URL, password included: for the control plane's clients only."""
        if self._url is None:
            raise RuntimeError("embedded broker is not running")
        return self._url

    @property
    def device_url(self) -> str | None:
        """The device listener's URL (``mqtts://``), None without ``device_tls``."""
        return self._device_url

    def start(self, timeout: float = 10.0) -> str:
        """Starts the broker and returns the control listener's URL
        (``mqtt://edgefleet-controlplane:<password>@host:port?protocol=3.1.1``) once it accepts
        connections."""
        if self._thread is not None:
            raise RuntimeError("embedded broker already started")
        loop = asyncio.new_event_loop()
        started: Future[tuple[int, int | None]] = Future()
        thread = threading.Thread(target=self._run, args=(loop, started), name="embedded-mqtt", daemon=True)
        self._loop, self._thread = loop, thread
        thread.start()
        try:
            port, device_port = started.result(timeout)
        except Exception as exc:
            self._join(timeout)
            raise BrokerStartError(f"embedded MQTT broker did not start on {self._host}: {exc}") from exc
        # The sockets listen once start_server has returned: connections queue in the backlog.
        # amqtt speaks MQTT 3.1.1 only, which the URLs say (?protocol=3.1.1).
        v311 = MQTTProtocolVersion.MQTTv311
        control = BrokerAddress(host=self._host, port=port, protocol=v311).url
        self._url = control.replace("mqtt://", f"mqtt://{CONTROL_USER}:{self._password}@", 1)
        if device_port is not None:
            self._device_url = BrokerAddress(host=self._host, port=device_port, tls=True, protocol=v311).url
        logger.info(
            "embedded MQTT broker: control plane on %s, devices on %s", control, self._device_url or "(none)"
        )
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
        self._device_url = None

    def __enter__(self) -> EmbeddedBroker:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # broker thread ---------------------------------------------------------------------------

    def _run(self, loop: asyncio.AbstractEventLoop, started: Future[tuple[int, int | None]]) -> None:
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

    async def _start_broker(self, loop: asyncio.AbstractEventLoop) -> tuple[int, int | None]:
        broker = _Broker(_broker_config(), loop=loop)
        await broker.start()
        self._broker = broker
        control = await asyncio.start_server(
            lambda r, w: self._gate(r, w, _CONTROL), self._host, self._port, limit=MAX_PACKET_BYTES
        )
        self._servers.append(control)
        device_port = None
        if self._device_tls is not None:
            devices = await asyncio.start_server(
                lambda r, w: self._gate(r, w, _DEVICES),
                self._host,
                self._device_port,
                ssl=_device_context(self._device_tls),
                limit=MAX_PACKET_BYTES,
            )
            self._servers.append(devices)
            device_port = int(devices.sockets[0].getsockname()[1])
        return int(control.sockets[0].getsockname()[1]), device_port

    async def _gate(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, listener: str) -> None:
        """Reads the CONNECT, refuses it with a CONNACK unless ``_verdict`` admits it, and
        hands an admitted connection (CONNECT included) to amqtt."""
        source = _Reader(reader, writer)
        out = StreamWriterAdapter(writer)
        try:
            connect = await asyncio.wait_for(ConnectPacket.from_stream(source), CONNECT_TIMEOUT_S)
        except Exception as exc:  # not MQTT, too large, too slow, or gone
            logger.info(
                "embedded broker: no usable CONNECT from %s: %r", writer.get_extra_info("peername"), exc
            )
            await out.close()
            return
        refusal = self._verdict(connect, writer.get_extra_info("ssl_object"), listener)
        if refusal is not None:
            logger.warning(
                "embedded broker refused client %r on the %s listener from %s (CONNACK %d)",
                connect.client_id,
                listener,
                writer.get_extra_info("peername"),
                refusal,
            )
            try:
                await ConnackPacket.build(0, refusal).to_stream(out)
            finally:
                await out.close()
            return
        source.replay()
        broker = self._broker
        if broker is None:
            await out.close()
            return
        # A newer connection with the same client id takes over, as on Mosquitto: the older one
        # is closed, so its client sees it at once and reconnects. amqtt alone stops serving
        # the older connection but leaves its socket open, and that client would wait for a
        # keepalive to time out before noticing.
        client_id = str(connect.client_id)
        previous = self._open.get(client_id)
        if previous is not None:
            logger.warning(
                "embedded broker: client id %r connected again; closing its older connection", client_id
            )
            previous.close()
        self._open[client_id] = writer
        try:
            await broker.external_connected(source, out, listener)
        finally:
            if self._open.get(client_id) is writer:
                del self._open[client_id]

    def _verdict(self, connect: ConnectPacket, ssl_object: Any, listener: str) -> int | None:
        """None to admit, else the CONNACK return code refusing the client."""
        if listener == _CONTROL:
            password = connect.password or ""
            given = password.encode() if isinstance(password, str) else bytes(password)
            if connect.username == CONTROL_USER and hmac.compare_digest(given, self._password.encode()):
                return None
            return int(BAD_USERNAME_PASSWORD)
        certificate = _peer_certificate(ssl_object)
        device_id = _device_id(certificate)
        if certificate is None or device_id is None or device_id.startswith(CONTROL_USER):
            return int(NOT_AUTHORIZED)
        if self._revoked(certificate, device_id):
            return int(NOT_AUTHORIZED)
        if connect.client_id != device_id or not connect.clean_session_flag:
            return int(IDENTIFIER_REJECTED)  # the client id is the certificate's, as on Mosquitto
        if connect.will_flag and not str(connect.will_topic).startswith(device_prefix(device_id) + "/"):
            return int(NOT_AUTHORIZED)
        return None

    def _revoked(self, certificate: x509.Certificate, device_id: str) -> bool:
        """Whether the CRL lists the certificate, or cannot be trusted (then every device is
        refused, and the control plane's upkeep re-issues it)."""
        if self._crl is None:
            return False
        try:
            revoked = self._crl.is_revoked(certificate.serial_number)
        except CrlUnusable as exc:
            logger.error("embedded broker: refusing device %s: %s", device_id, exc)
            return True
        if revoked:
            logger.warning(
                "embedded broker: device %s presented revoked certificate %x",
                device_id,
                certificate.serial_number,
            )
        return revoked

    async def _shutdown(self) -> None:
        for server in self._servers:
            server.close()
        if self._broker is not None:
            await self._broker.shutdown()
        for server in self._servers:
            await server.wait_closed()
        self._servers = []
        self._broker = None

    def _join(self, timeout: float) -> None:
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                logger.warning("embedded MQTT broker thread did not exit within %.1f s", timeout)
        self._thread = None
        self._loop = None


def _device_context(tls: DeviceTls) -> ssl.SSLContext:
    """TLS that requires a client certificate from the fleet CA. ssl loads a certificate chain
    only from files: they live in a private temporary directory for the moment it takes."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cadata=tls.ca_pem.decode())
    context.verify_mode = ssl.CERT_REQUIRED
    with tempfile.TemporaryDirectory() as private:
        chain = Path(private) / "broker.pem"
        chain.touch(mode=0o600)
        chain.write_bytes(tls.key_pem + tls.cert_pem)
        context.load_cert_chain(chain)
    return context
