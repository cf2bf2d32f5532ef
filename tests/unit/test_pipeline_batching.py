"""How the agent's publisher groups outbox records into messages (``batch_records``), and what
it refuses to be configured with."""

from __future__ import annotations

import json

import pytest

from edgefleet.agent.telemetry.drain import batch_records
from edgefleet.agent.telemetry.outbox import OutboxItem
from edgefleet.agent.telemetry.publisher import TelemetryPublisher
from edgefleet.protos.fleet.topics import TopicKind


def item(seq: int, kind: TopicKind = TopicKind.INFERENCE, size: int = 0) -> OutboxItem:
    body = {"seq": str(seq), "pad": "x" * size}
    return OutboxItem(seq=seq, kind=kind, payload=json.dumps(body, separators=(",", ":")).encode())


def seqs(items: list[OutboxItem], **limits: int) -> list[tuple[TopicKind, tuple[int, ...]]]:
    return [(batch.kind, batch.seqs) for batch in batch_records(items, **limits)]


def test_consecutive_records_of_one_kind_share_a_message_oldest_first() -> None:
    batches = batch_records([item(1), item(2), item(3)], max_records=100, max_bytes=1 << 20)
    assert [b.seqs for b in batches] == [(1, 2, 3)]
    assert [r["seq"] for r in json.loads(batches[0].payload)] == ["1", "2", "3"]


def test_a_change_of_kind_starts_a_new_message() -> None:
    mixed = [item(1), item(2, TopicKind.HEARTBEAT), item(3), item(4), item(5, TopicKind.DEPLOYMENT)]
    assert seqs(mixed, max_records=100, max_bytes=1 << 20) == [
        (TopicKind.INFERENCE, (1,)),
        (TopicKind.HEARTBEAT, (2,)),
        (TopicKind.INFERENCE, (3, 4)),
        (TopicKind.DEPLOYMENT, (5,)),
    ]


def test_a_message_holds_at_most_max_records() -> None:
    assert [s for _, s in seqs([item(i) for i in range(1, 8)], max_records=3, max_bytes=1 << 20)] == [
        (1, 2, 3),
        (4, 5, 6),
        (7,),
    ]


def test_a_message_stays_within_max_bytes() -> None:
    items = [item(i, size=300) for i in range(1, 20)]
    batches = batch_records(items, max_records=100, max_bytes=1024)
    assert all(len(b.payload) <= 1024 for b in batches)
    assert len(batches) > 1
    assert [s for b in batches for s in b.seqs] == list(range(1, 20))
    assert max(len(b.payload) for b in batches) > 1024 - 320  # filled, not one record each


def test_a_record_larger_than_max_bytes_goes_alone() -> None:
    batches = batch_records([item(1), item(2, size=5000), item(3)], max_records=100, max_bytes=1024)
    assert [b.seqs for b in batches] == [(1,), (2,), (3,)]


def test_nothing_to_send_makes_no_message() -> None:
    assert batch_records([], max_records=10, max_bytes=1024) == []


@pytest.mark.parametrize(
    "limits",
    [
        {"max_inflight": 0},
        {"max_inflight": 30, "window": 20},
        {"window": 20_000},
        {"max_batch_records": 0},
        {"max_batch_records": 300, "window": 200},
        {"max_batch_bytes": 100},
        {"message_expiry_s": -1},
    ],
)
def test_impossible_limits_are_refused(limits: dict[str, int]) -> None:
    with pytest.raises(ValueError, match=r"need|must"):
        TelemetryPublisher(device_id="d", broker_url="mqtt://127.0.0.1:1", outbox=None, **limits)  # type: ignore[arg-type]
