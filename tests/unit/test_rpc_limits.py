"""The bounds, pages, rate limits and refusal summaries of the control plane's calls, with a
fake clock and fake stubs (the same paths over real sockets: tests/integration/test_rpc_*.py)."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from edgefleet.controlplane.api import pages
from edgefleet.controlplane.api.limits import MAX_REPEATED, RequestTooLarge, check_request, clip, first_few
from edgefleet.controlplane.api.ratelimit import PeerLimiter, RateLimit, peer_key, retry_metadata
from edgefleet.controlplane.api.refusal_log import AuditRow, RefusalLog
from edgefleet.controlplane.cli.client import all_pages
from edgefleet.controlplane.store import errors, pins
from edgefleet.protos.fleet import selectors
from edgefleet.protos.fleet.v1 import common_pb2, device_pb2, operator_pb2


@dataclass
class Clock:
    now: float = 1000.0

    def __call__(self) -> float:
        return self.now


def test_requests_past_the_bounds_are_refused_at_any_depth() -> None:
    check_request(operator_pb2.DeployRequest(device_ids=["d"] * MAX_REPEATED))
    with pytest.raises(RequestTooLarge):
        check_request(operator_pb2.DeployRequest(device_ids=["d"] * (MAX_REPEATED + 1)))
    with pytest.raises(RequestTooLarge):
        check_request(device_pb2.StatusReport(selection={"rejections": [{"reason": "r" * 20_000}]}))
    with pytest.raises(RequestTooLarge):
        check_request(device_pb2.StatusReport(generation=2**64 - 1))
    with pytest.raises(RequestTooLarge):
        check_request(operator_pb2.CreateTokenRequest(labels={"k": "v" * 20_000}))


def test_error_texts_are_cut() -> None:
    assert len(clip("x" * 10_000, 100)) == 100
    text = first_few([f"dev-{i}" for i in range(50_000)], what="unknown device ids")
    assert text.startswith("50000 unknown device ids, first 5: ") and len(text) < 200


def test_labels_have_one_form_everywhere() -> None:
    selectors.check_labels({"hw": "jetson", "example.com/site": "eu-1", "t": ""})
    for bad in ({"hw": "a,b"}, {"a=b": "c"}, {"-x": "y"}, {"k": "v" * 129}, {f"k{i}": "" for i in range(33)}):
        with pytest.raises(selectors.InvalidLabels):
            selectors.check_labels(bad)
    with pytest.raises(errors.InvalidPin):
        pins.pin_scope(device_id=None, selector={"hw": "v" * 200})


def test_page_tokens_are_bound_to_method_and_filters() -> None:
    spec = pages.PageSpec("ListAudit", default_size=100, max_size=1000)
    assert (spec.size(0), spec.size(5), spec.size(10**6)) == (100, 5, 1000)
    token = pages.encode_token(spec, 42, {"actor": "a"})
    assert pages.decode_token(spec, token, {"actor": "a"}) == 42
    assert pages.decode_token(spec, "", {"actor": "a"}) is None
    for bad_token, filters in [(token, {"actor": "b"}), ("%%%", {}), ("x" * 5000, {}), ("bnVsbA", {})]:
        with pytest.raises(pages.InvalidPageToken):
            pages.decode_token(spec, bad_token, filters)
    other = pages.PageSpec("ListDevices", default_size=1, max_size=1)
    with pytest.raises(pages.InvalidPageToken):
        pages.decode_token(other, token, {"actor": "a"})


def test_a_page_is_cut_by_bytes_and_keeps_at_least_one_entry() -> None:
    spec = pages.PageSpec("QueryTelemetry", default_size=10, max_size=10)
    rows = list(range(1, 8))

    def encode(n: int) -> operator_pb2.TelemetryRow:
        return operator_pb2.TelemetryRow(seq=n, payload_json="x" * 1000)

    page = pages.cut(spec, rows, size=5, encode=encode, key=lambda n: n, filters={}, budget=2500)
    assert [r.seq for r in page.items] == [1, 2]
    assert pages.decode_token(spec, page.next_page_token, {}) == 2
    alone = pages.cut(spec, rows, size=5, encode=encode, key=lambda n: n, filters={}, budget=10)
    assert len(alone.items) == 1 and alone.next_page_token
    last = pages.cut(spec, rows[:3], size=5, encode=encode, key=lambda n: n, filters={})
    assert len(last.items) == 3 and last.next_page_token == ""


@dataclass
class PagedStub:
    """A ListDevices that answers two devices a page, recording what it was asked."""

    devices: list[str]
    asked: list[tuple[int, str]] = field(default_factory=list)

    def ListDevices(self, request: operator_pb2.ListDevicesRequest) -> operator_pb2.ListDevicesResponse:
        self.asked.append((request.page_size, request.page_token))
        start = int(request.page_token or 0)
        end = start + min(request.page_size or 2, 2)
        reply = operator_pb2.ListDevicesResponse(
            devices=[common_pb2.DeviceSummary(device_id=d) for d in self.devices[start:end]]
        )
        if end < len(self.devices):
            reply.next_page_token = str(end)
        return reply


def test_fleetctl_follows_pages_and_stops_at_its_limit() -> None:
    stub = PagedStub([f"dev-{i}" for i in range(5)])
    everything = all_pages(stub.ListDevices, operator_pb2.ListDevicesRequest(), "devices")
    assert [d.device_id for d in everything] == stub.devices
    assert [token for _, token in stub.asked] == ["", "2", "4"]
    stub.asked.clear()
    first_three = list(all_pages(stub.ListDevices, operator_pb2.ListDevicesRequest(), "devices", limit=3))
    assert [d.device_id for d in first_three] == stub.devices[:3]
    assert stub.asked == [(3, ""), (1, "2")]


def test_a_peer_is_refused_once_its_refusals_empty_its_bucket() -> None:
    clock = Clock()
    limiter = PeerLimiter(RateLimit(burst=3, per_second=0.5, max_peers=2), clock)
    for _ in range(3):
        assert limiter.retry_after("a") == 0
        limiter.charge("a")
    assert limiter.retry_after("a") == pytest.approx(2.0)
    assert limiter.retry_after("b") == 0  # another peer is not affected
    clock.now += 2.0
    assert limiter.retry_after("a") == 0
    limiter.charge("b")
    limiter.charge("c")  # the table holds two peers: the least recently refused is forgotten
    assert len(limiter) == 2 and limiter.retry_after("a") == 0


def test_peers_are_addresses_and_ipv6_64s() -> None:
    assert peer_key("ipv4:10.1.2.3:5555") == "10.1.2.3"
    assert peer_key("ipv6:%5B2001:db8::1%5D:5555") == "2001:db8::/64"
    assert peer_key("ipv6:[2001:db8::ffff]:1") == "2001:db8::/64"
    assert peer_key("unix:/tmp/sock") == "unix"


def test_retry_metadata_carries_the_delay() -> None:
    metadata = dict(retry_metadata(8, "slow down", 2.2))
    assert metadata["retry-after"] == "3"
    assert isinstance(metadata["grpc-status-details-bin"], bytes)


@dataclass
class Written:
    rows: list[AuditRow] = field(default_factory=list)

    async def __call__(self, rows: list[AuditRow]) -> None:
        self.rows.extend(rows)


async def refuse(log: RefusalLog, peer: str, kind: str = "PERMISSION_DENIED:Refused") -> None:
    await log.refused(
        peer=peer, actor="device:unenrolled", action="device.enroll", target="t", kind=kind, reason="r"
    )


async def test_repeated_refusals_are_one_entry_and_one_summary_per_window() -> None:
    clock, written = Clock(), Written()
    log = RefusalLog(written, window_seconds=60, clock=clock)
    for _ in range(500):
        await refuse(log, "10.0.0.1")
    assert len(written.rows) == 1 and written.rows[0].detail["peer"] == "10.0.0.1"
    await refuse(log, "10.0.0.1", kind="INVALID_ARGUMENT:Refused")  # another reason: its own entry
    assert len(written.rows) == 2
    clock.now += 60
    await log.close_windows()
    summaries = written.rows[2:]
    assert [s.detail["repeats"] for s in summaries] == [499]
    assert len(log) == 0
    await log.aclose()


async def test_a_flood_from_many_peers_writes_a_bounded_number_of_entries() -> None:
    clock, written = Clock(), Written()
    log = RefusalLog(written, window_seconds=60, max_groups=50, max_first_entries=10, clock=clock)
    for i in range(1000):
        await refuse(log, f"10.0.{i // 256}.{i % 256}")
    assert len(written.rows) == 10 + 1  # ten peers' first refusals, then one for every other peer
    await log.aclose()
    summaries = [r for r in written.rows if "repeats" in r.detail]
    assert [(s.detail["peer"], s.detail["repeats"]) for s in summaries] == [("*", 1000 - 11)]
