"""Notice payloads stay under PostgreSQL's 8000-byte limit: a change listing few devices names
them, one too large to list becomes ``*``, which a replica resolves by re-reading all its
streams at once (and wakes only those behind, or revoked)."""

from __future__ import annotations

from edgefleet.controlplane.fleet.changes import parse_notice
from edgefleet.controlplane.fleet.notifier import DesiredStateNotifier
from edgefleet.controlplane.store.devices import (
    MAX_NOTICE_BYTES,
    NOTICE_ALL,
    NOTICE_CHANGED,
    NOTICE_REVOKED,
    notice_payloads,
)


def test_a_few_devices_are_named_and_read_back() -> None:
    [payload] = notice_payloads(NOTICE_REVOKED, {"dev-b", "dev-a"})
    assert payload == "r:dev-a,dev-b"
    assert parse_notice(payload) == (NOTICE_REVOKED, ["dev-a", "dev-b"])


def test_a_change_too_large_to_list_becomes_all() -> None:
    many = {f"dev-{i:012x}" for i in range(10_000)}
    assert notice_payloads(NOTICE_CHANGED, many) == [NOTICE_ALL]
    fits = {f"dev-{i:012x}" for i in range(MAX_NOTICE_BYTES // 17)}
    [payload] = notice_payloads(NOTICE_CHANGED, fits)
    assert len(payload.encode()) <= MAX_NOTICE_BYTES and parse_notice(payload)[1] == sorted(fits)


def test_an_unreadable_notice_asks_for_a_full_recheck() -> None:
    for payload in ("", "x:dev-a", "g:", "garbage"):
        assert parse_notice(payload) == (NOTICE_ALL, [])


def test_stale_names_streams_behind_revoked_or_removed() -> None:
    notifier = DesiredStateNotifier()
    with (
        notifier.subscribe("current") as current,
        notifier.subscribe("behind") as behind,
        notifier.subscribe("revoked"),
        notifier.subscribe("removed"),
    ):
        current.sent = behind.sent = 3
        assert sorted(notifier.stale({"current": 3, "behind": 4, "revoked": None})) == [
            "behind",
            "removed",
            "revoked",
        ]
    assert notifier.connected() == []
