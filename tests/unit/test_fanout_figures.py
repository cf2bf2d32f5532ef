"""bench.fanout's arithmetic: sizes parsed, the fleet split over workers, the summary line's
figures, ratio and targets (no control plane: the numbers are given)."""

from __future__ import annotations

import argparse

import pytest

from bench.fanout import parse_sizes
from bench.fanout_figures import Run, summary
from bench.sim_pool import split, workers_for


def test_sizes_are_positive_and_increasing() -> None:
    assert parse_sizes("100,1000,10000") == (100, 1000, 10000)
    for bad in ("", "100,x", "0,100", "1000,100", "100,100"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_sizes(bad)


def test_fleet_split_is_even_and_covers_every_device() -> None:
    assert split(10_000, 4) == [2500, 2500, 2500, 2500]
    assert split(10, 3) == [4, 3, 3]
    assert split(2, 5) == [1, 1]  # no empty worker
    assert workers_for(100, 2500) == 1
    assert workers_for(10_000, 2500) == 4
    assert workers_for(10_001, 2500) == 5


def run(devices: int, *, fanout_s: float, call_s: float, enroll_s: float, kib: float) -> Run:
    return Run(
        devices=devices,
        enroll_s=enroll_s,
        deploy_call_s=call_s,
        deploy_fanout_s=fanout_s,
        deploy_reported_s=fanout_s * 2,
        cp_rss_idle_mib=100.0,
        cp_rss_enrolled_mib=100.0 + kib / 2 * devices / 1024,
        cp_rss_connected_mib=100.0 + kib * devices / 1024,
        cp_rss_after_fanout_mib=100.0 + kib * devices / 1024,
    )


def test_summary_judges_the_largest_size_against_every_target() -> None:
    runs = [
        run(100, fanout_s=0.1, call_s=0.05, enroll_s=0.5, kib=60.0),
        run(10_000, fanout_s=12.0, call_s=5.0, enroll_s=125.0, kib=70.0),
    ]
    line = summary(runs, [], {"sizes": [100, 10_000]})
    assert line["ratio_of"] == "deploy"
    assert line["ratio"] == pytest.approx((12.0 / 10_000) / (0.1 / 100))
    figures = line["figures"]
    assert figures["deploy_call_ms_per_device"] == pytest.approx(0.5)
    assert figures["enroll_per_s"] == pytest.approx(80.0)
    assert figures["cp_kib_per_connected_device"] == pytest.approx(70.0)
    assert figures["cp_kib_per_added_device"] == pytest.approx((70.0 * 10_000 - 60.0 * 100) / 9_900, abs=0.1)
    top = figures["runs"][-1]
    assert top["cp_kib_per_enrolled_device"] == pytest.approx(35.0)
    assert top["cp_kib_per_connection"] == pytest.approx(35.0)
    assert line["met"] == {
        "ratio": True,
        "deploy_call_ms_per_device": True,
        "deploy_fanout_s": False,  # 12 s > 10 s
        "rollout_fanout_s": False,  # not measured
        "cp_kib_per_connected_device": False,  # 70 KiB > 64
        "enroll_per_s": False,  # 80/s < 100
    }
    assert line["target"] == line["targets"]["ratio_max"] == 1.5


def test_the_ratio_is_the_deploys_even_when_the_rollout_was_measured() -> None:
    small = run(100, fanout_s=0.5, call_s=0.05, enroll_s=0.5, kib=60.0)
    large = run(10_000, fanout_s=8.0, call_s=5.0, enroll_s=60.0, kib=60.0)
    small.rollout_fanout_s, large.rollout_fanout_s = 1.5, 9.0
    line = summary([small, large], [], {})
    assert line["ratio_of"] == "deploy"
    assert line["ratio"] == pytest.approx((8.0 / 10_000) / (0.5 / 100))
    assert line["met"]["rollout_fanout_s"] is True
    assert line["figures"]["scaling"]["rollout"] == pytest.approx((9.0 / 10_000) / (1.5 / 100), abs=1e-3)
