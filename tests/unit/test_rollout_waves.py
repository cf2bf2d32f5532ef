"""Wave sizing and membership (controlplane/rollouts/waves.py): cumulative sizes, rounding up,
at least one device, the last wave takes the rest, and where devices joining late go."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from edgefleet.controlplane.rollouts.waves import (
    InvalidWaves,
    WaveSize,
    check_waves,
    cumulative_sizes,
    place,
)


def pct(*values: float) -> list[WaveSize]:
    return [WaveSize(percent=v) for v in values]


def counts(*values: int) -> list[WaveSize]:
    return [WaveSize(count=v) for v in values]


@pytest.mark.parametrize(
    ("waves", "total", "expected"),
    [
        (pct(1, 10, 50, 100), 20, [1, 2, 10, 20]),
        (pct(1, 10, 50, 100), 1000, [10, 100, 500, 1000]),
        (pct(1, 10, 50, 100), 3, [1, 1, 2, 3]),  # at least one; a wave may add nobody
        (pct(7, 100), 100, [7, 100]),  # 7% of 100 is 7, not 8 by float error
        (pct(33.3, 100), 10, [4, 10]),  # rounds up
        (pct(10, 50), 20, [2, 20]),  # the last wave takes every remaining device
        (counts(1, 10, 100), 20, [1, 10, 20]),
        (counts(1, 10, 100), 5, [1, 5, 5]),
        (counts(5), 3, [3]),
        ([], 7, [7]),  # no waves: one wave of everyone
        (pct(1, 10), 0, [0, 0]),
    ],
)
def test_cumulative_sizes(waves: list[WaveSize], total: int, expected: list[int]) -> None:
    assert cumulative_sizes(waves, total) == expected


@given(
    st.lists(st.floats(min_value=0.01, max_value=100), min_size=1, max_size=6, unique=True).map(sorted),
    st.integers(min_value=0, max_value=5000),
)
def test_sizes_grow_cover_everyone_and_hold_at_least_one(percents: list[float], total: int) -> None:
    sizes = cumulative_sizes(pct(*percents), total)
    assert len(sizes) == len(percents)
    assert sizes == sorted(sizes)
    assert sizes[-1] == total
    assert all(0 <= s <= total for s in sizes)
    if total:
        assert sizes[0] >= 1


@pytest.mark.parametrize(
    ("waves", "message"),
    [
        (pct(10, 10), "must grow"),
        (pct(50, 10), "must grow"),
        (pct(0), "above 0"),
        (pct(101), "at most 100"),
        (counts(0, 5), "at least 1"),
        ([WaveSize(percent=1), WaveSize(count=10)], "all percentages"),
        ([WaveSize()], "either a percentage or a device count"),
    ],
)
def test_nonsense_waves_are_refused(waves: list[WaveSize], message: str) -> None:
    with pytest.raises(InvalidWaves, match=message):
        check_waves(waves)


def test_sensible_waves_pass() -> None:
    check_waves(pct(1, 10, 50, 100))
    check_waves(counts(1, 10, 100))
    check_waves([])


def test_first_placement_fills_the_waves_to_their_sizes() -> None:
    sizes = cumulative_sizes(pct(1, 10, 50, 100), 20)
    placed = place([0, 0, 0, 0], sizes, 0, 20)
    assert [placed.count(w) for w in range(4)] == [1, 1, 8, 10]
    assert placed == sorted(placed)  # the first devices (by id) form the canary


def test_a_late_device_joins_the_current_wave_while_it_has_room() -> None:
    # 20 devices placed [1, 1, 8, 10]; wave 1 running; a 21st enrolls: wave 1 may hold 3 of 21.
    sizes = cumulative_sizes(pct(1, 10, 50, 100), 21)
    assert sizes == [1, 3, 11, 21]
    assert place([1, 1, 8, 10], sizes, 1, 1) == [1]


def test_a_late_device_goes_to_a_later_wave_or_the_last_when_the_current_is_full() -> None:
    sizes = cumulative_sizes(pct(1, 10, 50, 100), 21)  # [1, 3, 11, 21]
    assert place([1, 3, 6, 10], sizes, 1, 1) == [2]  # wave 1 full, wave 2 has room
    assert place([1, 3, 7, 9], sizes, 1, 1) == [3]  # waves 1 and 2 full: the last wave
    sizes = cumulative_sizes(pct(1, 10, 50, 100), 22)  # [1, 3, 11, 22]
    assert place([1, 3, 7, 9], sizes, 3, 2) == [3, 3]


def test_done_waves_never_get_a_device() -> None:
    sizes = cumulative_sizes(pct(50, 100), 10)
    # Wave 0 (done) is below its size after devices left; a newcomer still goes to wave 1.
    assert place([3, 5], sizes, 1, 1) == [1]


@given(
    st.lists(st.integers(min_value=0, max_value=50), min_size=1, max_size=5),
    st.integers(min_value=0, max_value=4),
    st.integers(min_value=0, max_value=30),
)
def test_placement_never_goes_before_the_first_open_wave(held: list[int], first_open: int, new: int) -> None:
    sizes = cumulative_sizes(pct(*[10 * (i + 1) for i in range(len(held) - 1)], 100), sum(held) + new)
    placed = place(held, sizes, first_open, new)
    assert len(placed) == new
    assert all(min(first_open, len(held) - 1) <= w < len(held) for w in placed)
