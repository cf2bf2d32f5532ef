"""Keep-alive: an idle model is unloaded, reloaded by the next request, never unloaded in use."""

from __future__ import annotations

import time
from collections.abc import Callable

from edgefleet.agent.runtimes.base import SamplingParams
from edgefleet.agent.runtimes.keep_alive import KeepAliveRuntime
from tests.unit.test_api import FakeRuntime

KEEP_ALIVE_S = 0.3


def until(condition: Callable[[], bool], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def test_an_idle_model_is_unloaded_and_the_next_request_loads_it_again() -> None:
    loads: list[FakeRuntime] = []

    def reload() -> FakeRuntime:
        loads.append(FakeRuntime())
        return loads[-1]

    first = FakeRuntime()
    runtime = KeepAliveRuntime(first, reload=reload, keep_alive_s=KEEP_ALIVE_S)
    try:
        assert runtime.complete("hello", SamplingParams(max_tokens=3)).text
        assert until(lambda: not runtime.loaded) and first.unloaded
        assert runtime.describe().model_id == first.model_id  # described without loading
        assert loads == []

        assert runtime.complete("hello", SamplingParams(max_tokens=3)).text
        assert len(loads) == 1 and runtime.loaded
        assert runtime.embed(["a", "b"]).vectors
        assert len(loads) == 1  # used again within the keep-alive: no reload
    finally:
        runtime.unload()
    assert loads[0].unloaded and not runtime.loaded


def test_a_model_in_use_is_not_unloaded() -> None:
    first = FakeRuntime()
    runtime = KeepAliveRuntime(first, reload=FakeRuntime, keep_alive_s=KEEP_ALIVE_S)
    try:
        generation = runtime.complete_stream("hello", SamplingParams(max_tokens=3))
        time.sleep(3 * KEEP_ALIVE_S)
        assert runtime.loaded and not first.unloaded  # the open generation holds it
        generation.close()
        assert until(lambda: not runtime.loaded)
    finally:
        runtime.unload()


def test_a_runtime_without_lora_refuses_adapters() -> None:
    from pathlib import Path

    import pytest

    from edgefleet.agent.runtimes.base import CapabilityNotSupported
    from edgefleet.agent.runtimes.lora import UnknownLora

    runtime = KeepAliveRuntime(FakeRuntime(), reload=FakeRuntime, keep_alive_s=None)
    try:
        with pytest.raises(CapabilityNotSupported):
            runtime.load_lora("style", Path("style.gguf"))
        assert runtime.loras() == ()
        with pytest.raises(UnknownLora):
            runtime.unload_lora("style")
    finally:
        runtime.unload()
