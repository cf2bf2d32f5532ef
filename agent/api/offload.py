"""Generation runs in worker threads; the event loop only awaits its results.

llama.cpp holds the CPU for the whole generation, so calling it on the event loop would
freeze every other request (health checks included). Every generation, streamed or not,
gets a dedicated thread that hands deltas to the loop through an asyncio queue and stops
as soon as the consumer cancels, so a client that leaves frees the model within a token.
A generation that can push its deltas itself (`PushingGeneration`, e.g. llama.cpp's, from
its own thread) does so: that thread then hands each delta to the loop directly, and the
dedicated thread only waits for the end instead of relaying every token.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from edgefleet.agent.api.choices import Choices
from edgefleet.agent.runtimes.base import Completion, Delta, Generation, PushingGeneration


@dataclass(frozen=True, slots=True)
class Collected:
    """A drained generation plus when its first delta appeared (time.perf_counter clock)."""

    completion: Completion
    first_delta_at: float | None
    finished_at: float


@dataclass(frozen=True, slots=True)
class _Failed:
    error: Exception


class _End:
    pass


_END = _End()


class TokenPump:
    """Moves one generation's deltas from its own thread onto the event loop.

    The thread asks the generation for the next delta only while nobody has cancelled, so a
    disconnected client costs at most one more token. `on_done` runs on the thread once the
    generation is closed, whatever the outcome (the caller releases its model lease there).
    """

    def __init__(self, generation: Generation, *, on_done: Callable[[], None]) -> None:
        self._generation = generation
        self._on_done = on_done
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[Delta | _Failed | _End] = asyncio.Queue()
        self._cancelled = threading.Event()
        self._thread = threading.Thread(target=self._run, name="edgefleet-generate", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def cancel(self) -> None:
        """Stop generating after the current token; safe to call repeatedly, from any thread."""
        self._cancelled.set()

    async def next(self) -> Delta | None:
        """The next delta, None at the end; re-raises what the generation raised."""
        item = await self._queue.get()
        if isinstance(item, _Failed):
            raise item.error
        if isinstance(item, _End):
            return None
        return item

    def _run(self) -> None:
        try:
            if isinstance(self._generation, PushingGeneration):
                self._generation.stream_to(self._put, self._cancelled)
                self._put(_END)
                return
            while not self._cancelled.is_set():
                try:
                    delta = next(self._generation)
                except StopIteration:
                    self._put(_END)
                    return
                self._put(delta)
        except Exception as exc:  # every failure belongs to the consumer, which maps it to HTTP
            self._put(_Failed(exc))
        finally:
            try:
                self._generation.close()
            finally:
                self._on_done()

    def _put(self, item: Delta | _Failed | _End) -> None:
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, item)
        except RuntimeError:  # the loop is gone (server shut down): nobody is listening
            self._cancelled.set()


async def collect(pump: TokenPump, generation: Generation) -> Collected:
    """Drain a started pump into one Completion (with n > 1, one per choice: see
    edgefleet.agent.api.choices); cancelling this stops the generation."""
    choices = Choices()
    first_at: float | None = None
    try:
        while (delta := await pump.next()) is not None:
            if first_at is None:
                first_at = time.perf_counter()
            choices.add(delta)
    finally:
        pump.cancel()
    completion = choices.completion(
        prompt_tokens=generation.prompt_tokens, completion_tokens=generation.completion_tokens
    )
    return Collected(completion=completion, first_delta_at=first_at, finished_at=time.perf_counter())
