"""Gate arithmetic (controlplane/rollouts/gates.py) and the evidence it is fed
(controlplane/rollouts/evidence.py): rates, request-weighted ratios, who is judged."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from google.protobuf import json_format
from google.protobuf.timestamp_pb2 import Timestamp

from edgefleet.controlplane.rollouts import evidence
from edgefleet.controlplane.rollouts.gates import (
    Evidence,
    Figures,
    Interval,
    InvalidGates,
    Thresholds,
    health_gates,
    load_gate,
)
from edgefleet.controlplane.store.models import RolloutDevice, TelemetryRecord
from edgefleet.protos.fleet.v1 import common_pb2, telemetry_pb2

T0 = datetime(2026, 11, 22, 12, 0, tzinfo=UTC)


def figures(*intervals: Interval) -> Figures:
    return Figures.of(intervals)


def test_figures_add_up_exactly() -> None:
    f = figures(
        Interval(requests=10, errors=1, latency_ms_p95=100, decode_tokens=500, decode_seconds=10),
        Interval(requests=30, errors=0, latency_ms_p95=200, decode_tokens=100, decode_seconds=10),
    )
    assert (f.requests, f.errors) == (40, 1)
    assert f.p95 == pytest.approx((10 * 100 + 30 * 200) / 40)  # request-weighted
    assert f.tokens_per_second == pytest.approx(600 / 20)  # sums, not a mean of rates
    assert Figures().p95 is None and Figures().tokens_per_second is None


@pytest.mark.parametrize(
    ("failed", "settled", "total", "limit", "expected"),
    [
        (0, 1, 2, 0.1, None),  # still open
        (0, 2, 2, 0.1, True),
        (1, 1, 1, 0.1, False),  # the canary failed to load
        (1, 1, 10, 0.05, False),  # 1 of 10 already exceeds 5%, whatever the rest do
        (1, 10, 10, 0.1, True),  # 10% is not above 10%
        (3, 3, 3, 0.0, True),  # gate off
        (0, 0, 0, 0.1, True),  # an empty wave passes
    ],
)
def test_load_gate(failed: int, settled: int, total: int, limit: float, expected: bool | None) -> None:
    verdict = load_gate(
        failed=failed, settled=settled, total=total, thresholds=Thresholds(max_load_failure_rate=limit)
    )
    assert (None if verdict is None else verdict.passed) == expected


def device(name: str, new: Figures, old: Figures | None) -> Evidence:
    return Evidence(name, new, old)


STEADY = Interval(requests=100, errors=0, latency_ms_p95=200, decode_tokens=5000, decode_seconds=100)


def test_same_figures_pass_every_gate() -> None:
    thresholds = Thresholds(
        max_error_rate=0.05, max_p95_latency_ratio=1.5, min_tokens_per_second_ratio=0.7, min_requests=10
    )
    verdict = health_gates([device("a", figures(STEADY), figures(STEADY))], thresholds)
    assert verdict.passed, verdict.text
    assert "tokens/s ratio 1.00" in verdict.text and "p95 latency ratio 1.00" in verdict.text


def test_tokens_per_second_collapse_fails() -> None:
    slow = Interval(requests=100, latency_ms_p95=200, decode_tokens=1000, decode_seconds=100)  # 0.2x
    verdict = health_gates(
        [device("a", figures(slow), figures(STEADY))], Thresholds(min_tokens_per_second_ratio=0.7)
    )
    assert not verdict.passed
    assert verdict.text.startswith("tokens/s ratio 0.20 below 0.7")


def test_latency_ratio_is_request_weighted_over_devices() -> None:
    # Device a doubles its p95 on 300 requests, device b keeps it on 100: (2*300 + 1*100) / 400.
    a_new = Interval(requests=300, latency_ms_p95=400, decode_tokens=1, decode_seconds=1)
    b_new = Interval(requests=100, latency_ms_p95=200, decode_tokens=1, decode_seconds=1)
    old = Interval(requests=100, latency_ms_p95=200, decode_tokens=1, decode_seconds=1)
    verdict = health_gates(
        [device("a", figures(a_new), figures(old)), device("b", figures(b_new), figures(old))],
        Thresholds(max_p95_latency_ratio=1.5),
    )
    assert not verdict.passed
    assert "p95 latency ratio 1.75 above 1.5" in verdict.text


def test_error_rate_pools_requests() -> None:
    a = Interval(requests=90, errors=0)
    b = Interval(requests=10, errors=10)
    verdict = health_gates(
        [device("a", figures(a), None), device("b", figures(b), None)], Thresholds(max_error_rate=0.05)
    )
    assert not verdict.passed
    assert "error rate 10.0% above 5.0%" in verdict.text


def test_devices_without_enough_requests_or_baseline_are_not_judged_on_ratios() -> None:
    slow = Interval(requests=5, latency_ms_p95=900, decode_tokens=10, decode_seconds=10)
    thresholds = Thresholds(min_tokens_per_second_ratio=0.7, max_p95_latency_ratio=1.2, min_requests=20)
    verdict = health_gates(
        [
            device("few", figures(slow), figures(STEADY)),  # 5 < 20 requests: not judged
            device("new-model", figures(STEADY), None),  # no baseline
            device("thin-baseline", figures(STEADY), figures(Interval(requests=3, latency_ms_p95=1))),
        ],
        thresholds,
    )
    assert verdict.passed, verdict.text
    assert "not judged on ratios" in verdict.text
    for name in ("few (5 < 20 requests)", "new-model (no baseline)", "thin-baseline (no baseline)"):
        assert name in verdict.text


def test_nothing_to_judge_passes_and_says_so() -> None:
    verdict = health_gates([device("idle", Figures(), None)], Thresholds(max_error_rate=0.01, min_requests=1))
    assert verdict.passed
    assert "error rate not judged" in verdict.text


def test_thresholds_are_checked_and_round_trip() -> None:
    Thresholds(max_load_failure_rate=0.1, max_error_rate=1.0).check()
    with pytest.raises(InvalidGates, match="fraction"):
        Thresholds(max_error_rate=5).check()
    with pytest.raises(InvalidGates, match="negative"):
        Thresholds(min_tokens_per_second_ratio=-1).check()
    t = Thresholds(0.1, 0.02, 1.5, 0.7, 50)
    assert Thresholds.from_json(t.as_json()) == t


# -- evidence from stored summaries ----------------------------------------------------------


def stored(device_id: str, seq: int, release: tuple[str, int], end: datetime, tps: float) -> TelemetryRecord:
    """A TelemetryRecord as ingestion stores it: the InferenceSummary's protobuf JSON mapping."""
    end_ts, start_ts = Timestamp(), Timestamp()
    end_ts.FromDatetime(end)
    start_ts.FromDatetime(end - timedelta(seconds=30))
    message = telemetry_pb2.InferenceSummary(
        schema_version=1,
        device_id=device_id,
        seq=seq,
        time=end_ts,
        window_start=start_ts,
        model=release[0],
        bundle=common_pb2.BundleRef(name=release[0], version=release[1]),
        requests=10,
        errors=0,
        latency_ms_p95=100,
        tokens_per_second=tps,
        decode_tokens=int(tps * 10),
        decode_seconds=10,
    )
    return TelemetryRecord(
        device_id=device_id, kind="inference", seq=seq, time=end, payload=json_format.MessageToDict(message)
    )


def test_release_evidence_compares_the_new_release_with_the_previous_on_the_same_device() -> None:
    row = RolloutDevice(rollout_id=1, device_id="d", previous_bundle_id=7, assigned_at=T0)
    rows = [
        stored("d", 1, ("m", 1), T0 - timedelta(hours=2), 1.0),  # outside the baseline window
        stored("d", 2, ("m", 1), T0 - timedelta(minutes=10), 50.0),
        stored("d", 3, ("other", 1), T0 - timedelta(minutes=5), 999.0),  # another model
        stored("d", 4, ("m", 2), T0 + timedelta(minutes=1), 10.0),
    ]
    [found] = evidence.for_release(
        [row],
        [evidence.summary(r) for r in rows],
        release=("m", 2),
        previous={7: ("m", 1)},
        baseline=timedelta(hours=1),
    )
    assert found.new.tokens_per_second == pytest.approx(10.0)
    assert found.old is not None and found.old.tokens_per_second == pytest.approx(50.0)


def test_config_evidence_compares_before_and_after_on_the_same_release() -> None:
    row = RolloutDevice(
        rollout_id=1, device_id="d", assigned_at=T0, applied_at=T0 + timedelta(minutes=1), previous_config={}
    )
    rows = [
        stored("d", 1, ("m", 1), T0 - timedelta(minutes=10), 40.0),
        stored("d", 2, ("x", 1), T0 - timedelta(minutes=10), 999.0),  # not served after: not compared
        stored("d", 3, ("m", 1), T0 + timedelta(seconds=70), 1.0),  # began before the config applied
        stored("d", 4, ("m", 1), T0 + timedelta(minutes=5), 20.0),
    ]
    [found] = evidence.for_config([row], [evidence.summary(r) for r in rows], baseline=timedelta(hours=1))
    assert found.new.tokens_per_second == pytest.approx(20.0)
    assert found.old is not None and found.old.tokens_per_second == pytest.approx(40.0)
