"""The generation object every adapter shares (llama.cpp, MLX, ONNX Runtime).

Each allows one generation at a time per runtime; llama.cpp and MLX step it on one OS
thread of their own, ONNX Runtime on whichever thread asks (`InlineCalls`). A generation
takes the runtime's slot on its first `next()`, not when created, so a request can be
validated (and refused) without queueing behind another; it gives the slot back when
exhausted, on an error, or on `close()`, and `unload()` waits for the slot.

Streaming (`stream_to`): on a backend thread that can queue work without waiting for it
(`PostingThread`), each step runs there and queues the next one itself, handing every delta
straight to the consumer's callback. Stepping through `next()` instead costs two thread
hand-offs per token (consumer -> backend -> consumer) while the backend sits idle: on 2
cores (SmolLM2, llama.cpp on one thread) that doubled the time between two decodes, from
about 0.4 ms to 0.8 ms a token (more under load), and held the API's streamed decode speed
to 0.93 of llama-cpp-python's own. Queueing the next step rather than looping still lets
other calls (embeddings) run between two tokens.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Generator, Iterator
from typing import Protocol, TypeVar, runtime_checkable

from edgefleet.agent.runtimes.base import ContextLengthExceeded, Delta, InvalidPromptError, RuntimeUnloaded

T = TypeVar("T")


class OwnThread(Protocol):
    """Runs a call on the backend's own thread and waits for it (RuntimeUnloaded once stopped)."""

    def call(self, fn: Callable[[], T]) -> T: ...


class StoppableThread(OwnThread, Protocol):
    def stop(self) -> None: ...


@runtime_checkable
class PostingThread(OwnThread, Protocol):
    def post(self, fn: Callable[[], None]) -> None:
        """Queue `fn` to run on the backend thread without waiting (RuntimeUnloaded once stopped)."""
        ...


def unload_on_own_thread(slot: threading.Lock, thread: StoppableThread, release: Callable[[], bool]) -> None:
    """Waits for the generation in progress, frees the model on its thread (``release`` says
    whether there was one to free) and ends the thread. Idempotent."""
    with slot:
        try:
            released = thread.call(release)
        except RuntimeUnloaded:  # already unloaded: the thread is gone
            return
        if released:
            thread.stop()


class InlineCalls:
    """For a backend that is safe on any thread: each step runs on the thread that asks."""

    def call(self, fn: Callable[[], T]) -> T:
        return fn()


def start_generation(
    *,
    slot: threading.Lock,
    thread: OwnThread,
    prompt: list[int],
    n_ctx: int,
    steps: Callable[[SlotGeneration], Generator[Delta, None, None]],
) -> SlotGeneration:
    """Validates the prompt against the context window, before any token or any queueing."""
    if not prompt:
        raise InvalidPromptError("the prompt is empty")
    if len(prompt) >= n_ctx:
        raise ContextLengthExceeded(prompt_tokens=len(prompt), n_ctx=n_ctx)
    return SlotGeneration(slot=slot, thread=thread, prompt=prompt, steps=steps)


class SlotGeneration:
    """One validated prompt, stepped on the backend thread while holding the runtime's slot."""

    def __init__(
        self,
        *,
        slot: threading.Lock,
        thread: OwnThread,
        prompt: list[int],
        steps: Callable[[SlotGeneration], Generator[Delta, None, None]],
    ) -> None:
        self.prompt = prompt
        self.completion_tokens = 0  # the steps count what they generate here
        self._slot = slot
        self._thread = thread
        self._steps = steps(self)
        self._holds_slot = False
        self._done = False

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt)

    def __iter__(self) -> Iterator[Delta]:
        return self

    def __next__(self) -> Delta:
        if self._done:
            raise StopIteration
        if not self._holds_slot:
            self._slot.acquire()
            self._holds_slot = True
        try:
            delta = self._thread.call(lambda: next(self._steps, None))
        except BaseException:
            self._finish()
            raise
        if delta is None:
            self._finish()
            raise StopIteration
        return delta

    def stream_to(self, emit: Callable[[Delta], None], cancelled: threading.Event) -> None:
        """Generate to the end, or until `cancelled` is set, handing each delta to `emit`.

        Blocks the calling (consumer) thread until then and re-raises what the generation
        raised; `close()` still follows. On a `PostingThread`, `emit` runs on the backend
        thread (it must be quick and thread-safe) and the consumer thread sleeps throughout;
        otherwise this steps through `next()` on the calling thread."""
        if not isinstance(self._thread, PostingThread):
            while not cancelled.is_set():
                try:
                    delta = next(self)
                except StopIteration:
                    return
                emit(delta)
            return
        if self._done:
            return
        if not self._holds_slot:
            self._slot.acquire()  # here, never on the backend thread (it must not block)
            self._holds_slot = True
        ended = threading.Event()
        exhausted = False
        failure: BaseException | None = None
        post = self._thread.post

        def step() -> None:
            """On the backend thread: one token, then queue the next step behind other calls."""
            nonlocal exhausted, failure
            try:
                if not cancelled.is_set():
                    delta = next(self._steps, None)
                    if delta is not None:
                        emit(delta)
                        post(step)
                        return
                    exhausted = True
            except BaseException as exc:
                failure = exc
            ended.set()

        try:
            post(step)
        except BaseException:
            self._finish()
            raise
        ended.wait()
        if failure is not None:
            self._finish()
            raise failure
        if exhausted:
            self._finish()
        # else cancelled: the generator stays open, and close() ends it on the backend thread

    def close(self) -> None:
        try:
            if self._holds_slot and not self._done:
                # Holding the slot means unload() is waiting for us, so the thread is alive.
                self._thread.call(self._steps.close)
        finally:
            self._finish()

    def _finish(self) -> None:
        self._done = True
        if self._holds_slot:
            self._holds_slot = False
            self._slot.release()
