"""The telemetry outbox: durable, ordered, bounded, and never reusing a sequence number."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from edgefleet.agent.telemetry import Outbox, OutboxCorruptError, OutboxError
from edgefleet.agent.telemetry.outbox import batch_size, encode_batch
from edgefleet.protos.fleet.topics import TopicKind
from edgefleet.protos.fleet.v1 import telemetry_pb2


def _inference(tokens_per_second: float = 12.5) -> telemetry_pb2.InferenceSummary:
    return telemetry_pb2.InferenceSummary(
        schema_version=telemetry_pb2.TELEMETRY_SCHEMA_V1,
        device_id="dev-1",
        model="smollm2",
        requests=3,
        requests_by_endpoint={"chat.completions": 3},
        latency_ms_p95=40.0,
        tokens_per_second=tokens_per_second,
    )


def _heartbeat() -> telemetry_pb2.Heartbeat:
    return telemetry_pb2.Heartbeat(schema_version=1, device_id="dev-1", requests_total=3)


def _deployment(generation: int) -> telemetry_pb2.DeploymentEvent:
    return telemetry_pb2.DeploymentEvent(schema_version=1, device_id="dev-1", generation=generation)


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "state" / "telemetry.sqlite3"


def test_put_assigns_increasing_seqs_and_stores_camel_case_json(path: Path) -> None:
    with Outbox(path) as outbox:
        message = _inference()
        assert outbox.put(TopicKind.INFERENCE, message) == 1
        assert message.seq == 1
        assert outbox.put(TopicKind.HEARTBEAT, _heartbeat()) == 2
        assert len(outbox) == 2
        items = outbox.pending(10)
    assert [(i.seq, i.kind) for i in items] == [(1, TopicKind.INFERENCE), (2, TopicKind.HEARTBEAT)]
    body = json.loads(items[0].payload)
    assert body["tokensPerSecond"] == 12.5
    assert body["latencyMsP95"] == 40.0
    assert body["requestsByEndpoint"] == {"chat.completions": "3"}
    assert body["deviceId"] == "dev-1"
    assert body["seq"] == "1"  # uint64 in protobuf's JSON mapping
    assert json.loads(items[1].payload)["requestsTotal"] == "3"


def test_seq_is_monotonic_across_reopen_and_never_reused_after_ack(path: Path) -> None:
    with Outbox(path) as outbox:
        seqs = [outbox.put(TopicKind.INFERENCE, _inference()) for _ in range(3)]
        for seq in seqs:
            assert outbox.ack(seq)
        assert len(outbox) == 0
    with Outbox(path) as outbox:
        assert outbox.next_seq == 4
        assert outbox.put(TopicKind.INFERENCE, _inference()) == 4
        assert [i.seq for i in outbox.pending(10)] == [4]


def test_ack_deletes_only_that_record(path: Path) -> None:
    with Outbox(path) as outbox:
        for _ in range(4):
            outbox.put(TopicKind.INFERENCE, _inference())
        assert outbox.ack(2)
        assert not outbox.ack(2)
        assert not outbox.ack(99)
        assert outbox.ack_many([1, 3, 42]) == 2
        assert [i.seq for i in outbox.pending(10)] == [4]
        assert len(outbox) == 1


def test_pending_is_oldest_first_with_limit_and_cursor(path: Path) -> None:
    with Outbox(path) as outbox:
        for _ in range(5):
            outbox.put(TopicKind.HEARTBEAT, _heartbeat())
        assert [i.seq for i in outbox.pending(2)] == [1, 2]
        assert [i.seq for i in outbox.pending(2, after=2)] == [3, 4]
        assert outbox.pending(10, after=5) == []


def test_records_survive_reopen(path: Path) -> None:
    with Outbox(path) as outbox:
        outbox.put(TopicKind.DEPLOYMENT, _deployment(7))
        outbox.put(TopicKind.INFERENCE, _inference(3.0))
    with Outbox(path) as outbox:
        assert len(outbox) == 2
        items = outbox.pending(10)
    assert json.loads(items[0].payload)["generation"] == "7"
    assert json.loads(items[1].payload)["tokensPerSecond"] == 3.0


def test_full_outbox_drops_oldest_non_deployment_first_and_counts(path: Path) -> None:
    with Outbox(path, max_records=3) as outbox:
        outbox.put(TopicKind.DEPLOYMENT, _deployment(1))  # 1
        outbox.put(TopicKind.INFERENCE, _inference())  # 2
        outbox.put(TopicKind.HEARTBEAT, _heartbeat())  # 3
        outbox.put(TopicKind.INFERENCE, _inference())  # 4 drops 2
        assert [i.seq for i in outbox.pending(10)] == [1, 3, 4]
        outbox.put(TopicKind.DEPLOYMENT, _deployment(2))  # 5 drops 3
        outbox.put(TopicKind.DEPLOYMENT, _deployment(3))  # 6 drops 4
        assert [i.seq for i in outbox.pending(10)] == [1, 5, 6]
        outbox.put(TopicKind.INFERENCE, _inference())  # 7: only deployments left, drops 1
        assert [i.seq for i in outbox.pending(10)] == [5, 6, 7]
        assert len(outbox) == 3
        assert outbox.dropped == 4
    with Outbox(path, max_records=3) as outbox:
        assert outbox.dropped == 4
        assert len(outbox) == 3


def test_lowering_max_records_on_reopen_trims_to_the_new_bound(path: Path) -> None:
    with Outbox(path) as outbox:
        for _ in range(5):
            outbox.put(TopicKind.INFERENCE, _inference())
    with Outbox(path, max_records=2) as outbox:
        outbox.put(TopicKind.INFERENCE, _inference())
        assert [i.seq for i in outbox.pending(10)] == [5, 6]
        assert outbox.dropped == 4


def test_rejects_a_message_of_the_wrong_kind(path: Path) -> None:
    with Outbox(path) as outbox, pytest.raises(TypeError):
        outbox.put(TopicKind.HEARTBEAT, _inference())


def test_concurrent_puts_and_acks_are_consistent(path: Path) -> None:
    threads, per_thread = 8, 40
    with Outbox(path) as outbox:
        seqs: list[int] = []
        seqs_lock = threading.Lock()
        errors: list[BaseException] = []

        def producer() -> None:
            try:
                for _ in range(per_thread):
                    seq = outbox.put(TopicKind.INFERENCE, _inference())
                    with seqs_lock:
                        seqs.append(seq)
            except BaseException as exc:  # surfaced below
                errors.append(exc)

        def acker() -> None:
            try:
                acked, cursor = 0, 0
                while acked < threads * per_thread // 2:
                    for item in outbox.pending(20, after=cursor):
                        cursor = item.seq
                        if item.seq % 2 == 0 and outbox.ack(item.seq):
                            acked += 1
            except BaseException as exc:
                errors.append(exc)

        workers = [threading.Thread(target=producer) for _ in range(threads)]
        ack_thread = threading.Thread(target=acker)
        for w in [*workers, ack_thread]:
            w.start()
        for w in workers:
            w.join(30)
        ack_thread.join(30)
        assert not errors
        assert sorted(seqs) == list(range(1, threads * per_thread + 1))
        remaining = [i.seq for i in outbox.pending(threads * per_thread)]
        assert remaining == [s for s in range(1, threads * per_thread + 1) if s % 2]
        assert len(outbox) == len(remaining)


_KILLED_WRITER = """
import os, sys
from pathlib import Path
from edgefleet.agent.telemetry.outbox import Outbox
from edgefleet.protos.fleet.topics import TopicKind
from edgefleet.protos.fleet.v1 import telemetry_pb2
outbox = Outbox(Path(sys.argv[1]))
for i in range(int(sys.argv[2])):
    seq = outbox.put(TopicKind.HEARTBEAT, telemetry_pb2.Heartbeat(device_id="dev-1"))
    print(seq, flush=True)
os._exit(0)  # no close(), no checkpoint: like a crash right after the last put
"""


def test_a_killed_process_loses_nothing_put_returned_for(path: Path) -> None:
    repo_root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": str(repo_root)}
    done = subprocess.run(
        [sys.executable, "-c", _KILLED_WRITER, str(path), "25"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    returned = [int(line) for line in done.stdout.split()]
    assert returned == list(range(1, 26))
    with Outbox(path) as outbox:
        assert [i.seq for i in outbox.pending(100)] == returned
        assert outbox.put(TopicKind.HEARTBEAT, _heartbeat()) == 26


def test_corrupt_file_raises_a_typed_error(path: Path) -> None:
    path.parent.mkdir(parents=True)
    path.write_bytes(b"this is not a sqlite database, just bytes" * 100)
    with pytest.raises(OutboxCorruptError):
        Outbox(path)


def test_unwritable_location_raises_outbox_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(OutboxError):
        Outbox(blocker / "sub" / "telemetry.sqlite3")


def test_newer_schema_is_refused(path: Path) -> None:
    Outbox(path).close()
    with sqlite3.connect(path) as conn:
        conn.execute("PRAGMA user_version=99")
    with pytest.raises(OutboxError, match="newer"):
        Outbox(path)


def test_uses_wal_and_full_sync(path: Path) -> None:
    with Outbox(path) as outbox:
        outbox.put(TopicKind.HEARTBEAT, _heartbeat())
        assert path.with_name(path.name + "-wal").exists()


def test_discard_deletes_and_counts_apart_from_dropped(path: Path) -> None:
    with Outbox(path) as outbox:
        for _ in range(4):
            outbox.put(TopicKind.INFERENCE, _inference())
        assert outbox.discard([2, 3, 99]) == 2
        assert [i.seq for i in outbox.pending(10)] == [1, 4]
        assert len(outbox) == 2
        assert (outbox.discarded, outbox.dropped) == (2, 0)
    with Outbox(path) as outbox:
        assert outbox.discarded == 2


def test_an_outbox_from_before_discard_counting_opens_with_zero(path: Path) -> None:
    with Outbox(path) as outbox:
        outbox.put(TopicKind.HEARTBEAT, _heartbeat())
    with sqlite3.connect(path) as conn:
        conn.execute("DELETE FROM meta WHERE key = 'discarded'")
    with Outbox(path) as outbox:
        assert outbox.discarded == 0
        assert outbox.discard([1]) == 1
        assert outbox.discarded == 1


def test_encode_batch_is_a_json_array_of_the_stored_records_oldest_first(path: Path) -> None:
    with Outbox(path) as outbox:
        outbox.put(TopicKind.INFERENCE, _inference(1.0))
        outbox.put(TopicKind.INFERENCE, _inference(2.0))
        payloads = [i.payload for i in outbox.pending(10)]
    batch = encode_batch(payloads)
    assert len(batch) == batch_size(sum(map(len, payloads)), len(payloads))
    assert [(r["seq"], r["tokensPerSecond"]) for r in json.loads(batch)] == [("1", 1.0), ("2", 2.0)]
    with pytest.raises(ValueError, match="at least one record"):
        encode_batch([])
