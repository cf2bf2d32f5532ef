"""The models' memory budget: the least recently used idle model makes way; one in use never does."""

from __future__ import annotations

import threading
import time

import pytest

from edgefleet.agent.runtimes.base import SamplingParams
from edgefleet.agent.runtimes.keep_alive import KeepAliveRuntime
from edgefleet.agent.runtimes.memory_budget import MemoryBudget, ModelMemoryExhausted
from tests.unit.test_api import FakeRuntime

MIB = 2**20


class Loads:
    """Counts loads per model name, like the updater's reload functions."""

    def __init__(self) -> None:
        self.count: dict[str, int] = {}
        self.live: list[FakeRuntime] = []

    def factory(self, name: str) -> FakeRuntime:
        self.count[name] = self.count.get(name, 0) + 1
        runtime = FakeRuntime(model_id=name)
        self.live.append(runtime)
        return runtime


def held(budget: MemoryBudget, name: str, loads: Loads, footprint: int) -> KeepAliveRuntime:
    """A model loaded through the budget, as the updater loads one, and kept reloadable."""
    first = budget.load(name=name, footprint_bytes=footprint, factory=lambda: loads.factory(name))
    return KeepAliveRuntime(
        first,
        reload=lambda: loads.factory(name),
        keep_alive_s=None,
        budget=budget,
        footprint_bytes=footprint,
    )


def ask(runtime: KeepAliveRuntime) -> str:
    return runtime.complete("hello", SamplingParams(max_tokens=2)).text


def test_the_least_recently_used_idle_model_is_unloaded_to_make_room() -> None:
    budget, loads = MemoryBudget(250 * MIB), Loads()
    a = held(budget, "a", loads, 100 * MIB)
    b = held(budget, "b", loads, 100 * MIB)
    ask(a)
    time.sleep(0.01)
    ask(b)  # a is now the least recently used
    c = held(budget, "c", loads, 100 * MIB)
    assert not a.loaded and b.loaded and c.loaded
    assert loads.live[0].unloaded, "a's runtime was not released"
    assert budget.resident_bytes() == 200 * MIB

    assert ask(a)  # named again: loads, and b (now least recent) makes way
    assert loads.count == {"a": 2, "b": 1, "c": 1}
    assert a.loaded and not b.loaded and c.loaded
    for runtime in (a, b, c):
        runtime.unload()
    assert budget.resident_bytes() == 0


def test_a_model_in_use_is_never_evicted_and_the_load_is_refused_clearly() -> None:
    budget, loads = MemoryBudget(150 * MIB), Loads()
    a = held(budget, "a", loads, 100 * MIB)
    generation = a.complete_stream("hello", SamplingParams(max_tokens=2))  # a is in use
    with pytest.raises(ModelMemoryExhausted, match=r"`b` needs an estimated 100 MiB.*\(a\)"):
        held(budget, "b", loads, 100 * MIB)
    assert a.loaded and "b" not in loads.count
    generation.close()
    b = held(budget, "b", loads, 100 * MIB)  # a is idle now: it makes way
    assert not a.loaded and b.loaded
    a.unload()
    b.unload()


def test_a_model_larger_than_the_whole_budget_is_refused_without_evicting() -> None:
    budget, loads = MemoryBudget(150 * MIB), Loads()
    a = held(budget, "a", loads, 100 * MIB)
    with pytest.raises(ModelMemoryExhausted, match="more than the models' memory budget"):
        held(budget, "big", loads, 200 * MIB)
    assert a.loaded
    a.unload()


def test_no_budget_never_evicts() -> None:
    budget, loads = MemoryBudget(None), Loads()
    runtimes = [held(budget, name, loads, 10**12) for name in "abc"]
    assert all(r.loaded for r in runtimes)
    for runtime in runtimes:
        runtime.unload()


def test_concurrent_loads_do_not_overcommit() -> None:
    """Two requests reloading two evicted models at once: the budget holds across both."""
    budget, loads = MemoryBudget(100 * MIB), Loads()
    a = held(budget, "a", loads, 100 * MIB)
    b = held(budget, "b", loads, 100 * MIB)  # evicts a
    assert not a.loaded
    b.unload()  # b leaves; only a (unloaded) remains a member
    outcomes: list[str] = []

    def reload_a() -> None:
        outcomes.append(ask(a))

    threads = [threading.Thread(target=reload_a) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(5)
    assert len(outcomes) == 4 and loads.count["a"] == 2  # reloaded once, not four times
    assert budget.resident_bytes() == 100 * MIB
    a.unload()
