"""MQTT broker URLs, parsed the same way by the agent and the control plane.

Both sides are configured with one string (``mqtt://host:port`` or ``mqtts://user:pass@host``)
so an operator writes the broker address once, in the form Mosquitto and EMQX document. The
parser is pure and strict: a typo in a deployment file should fail at start-up with a message
naming the problem, not as an endless reconnect to the wrong place.

Clients speak MQTT v5 (message expiry, shared subscriptions, reason codes). A broker that only
speaks 3.1.1 is named with ``?protocol=3.1.1``: the embedded demo broker is one; clients then
do without v5's features (one control-plane replica, no broker-side expiry).
"""

from __future__ import annotations

import enum
import ssl
from dataclasses import dataclass, field
from urllib.parse import SplitResult, unquote, urlsplit

import paho.mqtt.client as mqtt
from paho.mqtt.enums import MQTTProtocolVersion

PROTOCOLS = {"5": MQTTProtocolVersion.MQTTv5, "3.1.1": MQTTProtocolVersion.MQTTv311}
"""The ``protocol`` query values a broker URL may carry; MQTT v5 when absent."""


class BrokerScheme(enum.StrEnum):
    """The URL schemes accepted for a broker; the value is the scheme as written."""

    MQTT = "mqtt"
    MQTTS = "mqtts"

    @property
    def default_port(self) -> int:
        """IANA-registered MQTT ports: 1883 plain, 8883 over TLS."""
        return 8883 if self is BrokerScheme.MQTTS else 1883

    @property
    def tls(self) -> bool:
        return self is BrokerScheme.MQTTS


class BrokerUrlError(ValueError):
    """A broker URL that cannot be used; the message says which part is wrong."""


@dataclass(frozen=True, slots=True)
class BrokerAddress:
    """Where and how to connect to a broker. The password is kept out of ``repr``."""

    host: str
    port: int
    tls: bool = False
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    protocol: MQTTProtocolVersion = MQTTProtocolVersion.MQTTv5

    @property
    def v5(self) -> bool:
        return self.protocol == MQTTProtocolVersion.MQTTv5

    @property
    def url(self) -> str:
        """The URL without credentials, safe to log."""
        scheme = BrokerScheme.MQTTS if self.tls else BrokerScheme.MQTT
        host = f"[{self.host}]" if ":" in self.host else self.host
        query = "" if self.v5 else "?protocol=3.1.1"
        return f"{scheme.value}://{host}:{self.port}{query}"


def _scheme(parts: SplitResult, url: str) -> BrokerScheme:
    try:
        return BrokerScheme(parts.scheme.lower())
    except ValueError:
        allowed = ", ".join(f"{s.value}://" for s in BrokerScheme)
        shown = f"{parts.scheme}://" if parts.scheme else "none"
        raise BrokerUrlError(f"broker URL {url!r}: scheme {shown} is not one of {allowed}") from None


def _port(parts: SplitResult, scheme: BrokerScheme, url: str) -> int:
    try:
        port = parts.port
    except ValueError:
        raise BrokerUrlError(f"broker URL {url!r}: port must be a number from 1 to 65535") from None
    if port is None:
        if parts.netloc.rpartition("@")[2].endswith(":"):
            raise BrokerUrlError(f"broker URL {url!r}: a ':' is given but the port is empty")
        return scheme.default_port
    if port == 0:
        raise BrokerUrlError(f"broker URL {url!r}: port must be a number from 1 to 65535")
    return port


def _protocol(parts: SplitResult, url: str) -> MQTTProtocolVersion:
    if not parts.query:
        if "?" in url:
            raise BrokerUrlError(f"broker URL {url!r}: an empty query string is not allowed")
        return MQTTProtocolVersion.MQTTv5
    key, _, value = parts.query.partition("=")
    if key != "protocol" or value not in PROTOCOLS:
        allowed = " or ".join(f"protocol={v}" for v in PROTOCOLS)
        raise BrokerUrlError(f"broker URL {url!r}: the only query allowed is {allowed}")
    return PROTOCOLS[value]


def parse_broker_url(url: str) -> BrokerAddress:
    """Parses ``mqtt[s]://[user[:password]@]host[:port][?protocol=3.1.1]`` or raises BrokerUrlError.

    User and password may be percent-encoded (``%40`` for ``@``). A path other than ``/``, any
    other query, or a fragment is refused because MQTT has no use for them and their presence
    usually means a mistyped URL.
    """
    if not isinstance(url, str) or not url.strip():
        raise BrokerUrlError("broker URL is empty")
    if url != url.strip() or any(c.isspace() for c in url):
        raise BrokerUrlError(f"broker URL {url!r}: contains whitespace")
    if "://" not in url:
        raise BrokerUrlError(f"broker URL {url!r}: missing scheme, expected mqtt:// or mqtts://")
    parts = urlsplit(url)
    scheme = _scheme(parts, url)
    if parts.path not in ("", "/"):
        raise BrokerUrlError(f"broker URL {url!r}: a path ({parts.path!r}) is not allowed")
    protocol = _protocol(parts, url)
    if parts.fragment or "#" in url:
        raise BrokerUrlError(f"broker URL {url!r}: a fragment is not allowed")
    host = parts.hostname
    if not host:
        raise BrokerUrlError(f"broker URL {url!r}: missing host")
    port = _port(parts, scheme, url)
    username = unquote(parts.username) if parts.username is not None else None
    password = unquote(parts.password) if parts.password is not None else None
    if username == "":
        if password:
            raise BrokerUrlError(f"broker URL {url!r}: a password is given without a user name")
        username = None
        password = None
    return BrokerAddress(
        host=host, port=port, tls=scheme.tls, username=username, password=password, protocol=protocol
    )


RECONNECT_MIN_DELAY_S = 1
RECONNECT_MAX_DELAY_S = 30


def configure_client(
    client: mqtt.Client, address: BrokerAddress, tls_context: ssl.SSLContext | None = None
) -> None:
    """Applies what both sides set on a paho client for a broker: paho's own reconnect backoff,
    credentials from the URL, and TLS for ``mqtts://``."""
    client.reconnect_delay_set(min_delay=RECONNECT_MIN_DELAY_S, max_delay=RECONNECT_MAX_DELAY_S)
    if address.username is not None:
        client.username_pw_set(address.username, address.password)
    if address.tls:
        client.tls_set_context(tls_context or ssl.create_default_context())
