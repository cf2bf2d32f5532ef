"""The download token bucket (edgefleet.agent.update.rate_limit), on a fake clock."""

from __future__ import annotations

import asyncio

import pytest

from edgefleet.agent.update.rate_limit import MIN_BURST, TokenBucket


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


async def test_unlimited_never_waits(monkeypatch: pytest.MonkeyPatch) -> None:
    slept: list[float] = []

    async def sleep(seconds: float) -> None:
        slept.append(seconds)

    monkeypatch.setattr(asyncio, "sleep", sleep)
    bucket = TokenBucket(0)
    for _ in range(100):
        await bucket.take(1 << 30)
    assert slept == []


async def test_a_rate_makes_takers_wait_out_their_debt(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = Clock()
    slept: list[float] = []

    async def sleep(seconds: float) -> None:
        slept.append(seconds)
        clock.now += seconds

    monkeypatch.setattr(asyncio, "sleep", sleep)
    rate = 100_000
    bucket = TokenBucket(rate, clock=clock)
    assert bucket.burst == rate
    await bucket.take(rate)  # the first second's worth passes at once
    assert slept == []
    for _ in range(10):
        await bucket.take(rate // 2)
    assert sum(slept) == pytest.approx(5.0)
    assert clock.now == pytest.approx(5.0)
    clock.now += 100  # an idle bucket refills to its burst, no further
    await bucket.take(rate)
    await bucket.take(rate)
    assert sum(slept) == pytest.approx(6.0)


def test_a_slow_rate_still_bursts_a_network_read() -> None:
    assert TokenBucket(1024).burst == MIN_BURST
