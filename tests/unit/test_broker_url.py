"""Broker URL parsing: the defaults operators rely on and the mistakes that must fail loudly."""

from __future__ import annotations

import pytest

from edgefleet.protos.fleet.broker_url import BrokerAddress, BrokerUrlError, parse_broker_url


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("mqtt://127.0.0.1:1883", BrokerAddress("127.0.0.1", 1883, tls=False)),
        ("mqtt://broker.example", BrokerAddress("broker.example", 1883, tls=False)),
        ("mqtt://broker.example/", BrokerAddress("broker.example", 1883, tls=False)),
        ("mqtts://broker.example", BrokerAddress("broker.example", 8883, tls=True)),
        ("MQTTS://Broker.Example:9999", BrokerAddress("broker.example", 9999, tls=True)),
        ("mqtt://[::1]:1884", BrokerAddress("::1", 1884, tls=False)),
        ("mqtts://[2001:db8::1]", BrokerAddress("2001:db8::1", 8883, tls=True)),
        (
            "mqtt://device-7:s3cret@10.0.0.5:1883",
            BrokerAddress("10.0.0.5", 1883, tls=False, username="device-7", password="s3cret"),
        ),
        ("mqtts://alice@host", BrokerAddress("host", 8883, tls=True, username="alice", password=None)),
        (
            "mqtt://a%40b:p%3Ass%2Fw@host:1",
            BrokerAddress("host", 1, tls=False, username="a@b", password="p:ss/w"),
        ),
        ("mqtt://user:@host", BrokerAddress("host", 1883, tls=False, username="user", password="")),
    ],
)
def test_parses_valid_urls(url: str, expected: BrokerAddress) -> None:
    assert parse_broker_url(url) == expected


@pytest.mark.parametrize(
    ("url", "fragment"),
    [
        ("", "empty"),
        ("   ", "empty"),
        ("127.0.0.1:1883", "missing scheme"),
        ("tcp://host:1883", "scheme tcp://"),
        ("http://host", "scheme http://"),
        ("mqtt://", "missing host"),
        ("mqtt://:1883", "missing host"),
        ("mqtt://user:pw@:1883", "missing host"),
        ("mqtt://host:abc", "port must be a number"),
        ("mqtt://host:0", "port must be a number"),
        ("mqtt://host:65536", "port must be a number"),
        ("mqtt://host:", "port is empty"),
        ("mqtt://host/topic", "path"),
        ("mqtt://host?x=1", "query allowed is protocol=5 or protocol=3.1.1"),
        ("mqtt://host?protocol=4", "query allowed"),
        ("mqtt://host?", "empty query"),
        ("mqtt://host#frag", "fragment"),
        ("mqtt://host :1883", "whitespace"),
        (" mqtt://host", "whitespace"),
        ("mqtt://:pw@host", "password is given without a user name"),
    ],
)
def test_rejects_invalid_urls_with_a_specific_message(url: str, fragment: str) -> None:
    with pytest.raises(BrokerUrlError, match=fragment):
        parse_broker_url(url)


def test_error_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="scheme"):
        parse_broker_url("ftp://host")


def test_password_stays_out_of_repr_and_url() -> None:
    address = parse_broker_url("mqtts://dev:hunter2@broker:8884")
    assert "hunter2" not in repr(address)
    assert address.url == "mqtts://broker:8884"
    assert parse_broker_url("mqtt://[::1]").url == "mqtt://[::1]:1883"


def test_address_is_frozen() -> None:
    address = parse_broker_url("mqtt://host")
    with pytest.raises(AttributeError):
        address.port = 1  # type: ignore[misc]


def test_protocol_query_names_a_3_1_1_broker() -> None:
    from paho.mqtt.enums import MQTTProtocolVersion

    assert parse_broker_url("mqtt://host").protocol == MQTTProtocolVersion.MQTTv5
    old = parse_broker_url("mqtt://host:1884?protocol=3.1.1")
    assert old.protocol == MQTTProtocolVersion.MQTTv311 and not old.v5
    assert old.url == "mqtt://host:1884?protocol=3.1.1"
    assert parse_broker_url(old.url) == old
    assert parse_broker_url("mqtt://host?protocol=5").v5
