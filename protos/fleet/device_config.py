"""A device's runtime settings (``fleet.v1.DeviceConfig``): the rules a config must meet, and its
storage form.

The control plane signs a config into a device's director targets (field "config" of the
"edgefleet" custom field), so a config that passed here is what the device receives. The rules
are checked twice on purpose: here, so an operator's mistake is refused before it reaches any
device, and on the device (agent/update/updater.py), so a compromised director holding the online key
still cannot push a setting the agent would choke on. Both sides import this module, which
depends on the wire contract only, so there is exactly one set of rules.

Every field is optional: unset means "the agent's own setting" (its command line).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from google.protobuf import json_format

from edgefleet.protos.fleet.v1 import common_pb2


class InvalidConfig(ValueError):
    """A config breaks a rule; ``field`` names the offending field, the message its allowed range."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


@dataclass(frozen=True, slots=True)
class Bound:
    """The allowed range of one numeric field; ``zero_means`` names what 0 stands for when 0 is
    allowed below ``low`` (keep-alive: 0 is "never unload")."""

    field: str
    low: int
    high: int
    zero_means: str = ""

    def describe(self) -> str:
        span = f"{self.low}..{self.high}"
        return f"0 ({self.zero_means}) or {span}" if self.zero_means else span

    def admits(self, value: float) -> bool:
        if not math.isfinite(value):
            return False
        return (self.zero_means != "" and value == 0) or self.low <= value <= self.high


BOUNDS: tuple[Bound, ...] = (
    Bound("n_threads", 1, 1024),
    Bound("n_ctx", 128, 1_048_576),
    Bound("max_running", 1, 64),
    Bound("max_waiting", 0, 10_000),
    Bound("telemetry_interval_seconds", 1, 3600),
    Bound("keep_alive_seconds", 1, 604_800, zero_means="never unload"),
    Bound("max_download_rate", 1024, 100_000_000_000, zero_means="unlimited"),
)
"""The ranges of fleet.v1.DeviceConfig's numeric fields, as its proto comments state them."""

MAX_MIRRORS = 8
MAX_MIRROR_URL = 512
"""Bounds of ``mirrors``: each is tried in turn for every download, and the list is signed into
every targets file of the device, so it stays short."""


def known_formats() -> dict[int, str]:
    """Model formats a pin may name: every ModelFormat of the wire contract but UNSPECIFIED."""
    return {
        number: name
        for name, number in common_pb2.ModelFormat.items()
        if number != common_pb2.MODEL_FORMAT_UNSPECIFIED
    }


def is_empty(config: common_pb2.DeviceConfig | None) -> bool:
    """True when the config sets nothing: it changes no setting, so it is not signed at all."""
    return config is None or not config.ListFields()


def validate_config(config: common_pb2.DeviceConfig) -> None:
    """Raises InvalidConfig naming the first field outside its range, or a pin that is not
    exactly one of a variant id and a known format; returns quietly for a usable config."""
    for bound in BOUNDS:
        if not config.HasField(bound.field):
            continue
        value = getattr(config, bound.field)
        if not bound.admits(value):
            raise InvalidConfig(bound.field, f"must be {bound.describe()}, got {show_number(value)}")
    if config.HasField("pin"):
        _validate_pin(config.pin)
    validate_mirrors(config.mirrors)


def validate_mirrors(mirrors: Sequence[str]) -> None:
    """Mirrors are at most MAX_MIRRORS distinct http(s) base URLs with a host, of at most
    MAX_MIRROR_URL characters, without credentials, query or fragment (a blob path is appended
    to each, and a URL is logged: a password in it would leak)."""
    if len(mirrors) > MAX_MIRRORS:
        raise InvalidConfig("mirrors", f"at most {MAX_MIRRORS} mirrors, got {len(mirrors)}")
    if len(set(mirrors)) != len(mirrors):
        raise InvalidConfig("mirrors", "a mirror is listed twice")
    for index, url in enumerate(mirrors):
        where = f"mirrors[{index}]"
        if len(url) > MAX_MIRROR_URL:
            raise InvalidConfig(where, f"at most {MAX_MIRROR_URL} characters, got {len(url)}")
        if not url.isprintable() or any(c.isspace() for c in url):
            raise InvalidConfig(where, "must not contain spaces or control characters")
        try:
            parts = urlsplit(url)
            parts.port  # noqa: B018  (raises ValueError on a bad port)
        except ValueError as exc:
            raise InvalidConfig(where, f"not a URL: {exc}") from exc
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise InvalidConfig(where, f"must be an http:// or https:// URL with a host, got {url!r}")
        if parts.username is not None or parts.password is not None:
            raise InvalidConfig(where, "must not carry credentials")
        if parts.query or parts.fragment:
            raise InvalidConfig(where, "must not have a query or fragment: a blob path is appended to it")


def _validate_pin(pin: common_pb2.VariantPin) -> None:
    """The same rule as a director pin (agent/update/selection.py Pin): one variant id or one format.
    An empty pin message is refused rather than read as "no pin": leave ``pin`` unset for that."""
    if bool(pin.variant_id) == bool(pin.format):
        which = "both are set" if pin.variant_id else "neither is set; leave pin unset for no pin"
        raise InvalidConfig("pin", f"must name exactly one of variant_id and format ({which})")
    formats = known_formats()
    if pin.format and pin.format not in formats:
        listed = ", ".join(formats.values())
        raise InvalidConfig("pin.format", f"must be a known format ({listed}), got {pin.format}")


def show_number(value: float) -> str:
    """A setting as a person writes it: 4096, 2.5, 604800 (not 6.048e+05), nan."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def config_to_json(config: common_pb2.DeviceConfig) -> dict[str, Any]:
    """The config in its protobuf JSON mapping (camelCase keys, only the fields set): the form it
    is signed in and stored in.

    Doubles are written as decimal strings ("2.5", "300.0"), which the mapping accepts on input:
    TUF signs canonical JSON, which has no floating-point numbers, so a JSON number with a
    fraction could not be signed at all.
    """
    raw = json_format.MessageToDict(config)
    return {key: repr(value) if isinstance(value, float) else value for key, value in raw.items()}


def config_from_json(raw: object) -> common_pb2.DeviceConfig:
    """Reads a config from its protobuf JSON mapping; InvalidConfig when it is not one.

    Unknown fields are refused, not skipped: a setting this build does not know must not be
    dropped silently. Ranges are not checked here; call ``validate_config`` for that.
    """
    if not isinstance(raw, Mapping):
        raise InvalidConfig("config", f"must be a JSON object, not {type(raw).__name__}")
    try:
        return json_format.ParseDict(dict(raw), common_pb2.DeviceConfig())
    except json_format.ParseError as exc:
        raise InvalidConfig("config", f"not a DeviceConfig: {exc}") from exc


def describe_config(config: common_pb2.DeviceConfig | None) -> str:
    """One line a person reads in logs and status details, e.g. "n_ctx=4096, max_running=2"."""
    if is_empty(config):
        return "no device config"
    assert config is not None
    parts = [
        f"{field.name}={show_number(value)}"
        for field, value in config.ListFields()
        if field.name not in ("pin", "mirrors")
    ]
    if config.mirrors:
        parts.append(f"mirrors={','.join(config.mirrors)}")
    if config.HasField("pin"):
        pin = config.pin
        parts.append(f"pin={pin.variant_id or known_formats().get(pin.format, str(pin.format))}")
    return ", ".join(parts)
