"""Unloads an idle model after a keep-alive, or when the memory budget needs the room, and
loads it again on the next request.

A device that answers a few requests a day should not hold a model in memory all day (the
`keep_alive` of Ollama and Foundry Local), and a device holding several models need not hold
them all at once (memory_budget.py). The wrapper is a Runtime: the API leases it like any
other; loading again happens inside the calls the API already makes off the event loop
(opening a generation, embedding), so only the first request after an unload waits.
LoRA adapters loaded through the wrapper (`lora.LoraRuntime`) belong to it, not to one load
of the model: each reload loads them again, so a request naming one never finds it gone.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from edgefleet.agent.runtimes.base import (
    Capability,
    CapabilityNotSupported,
    ChatMessage,
    Completion,
    Delta,
    Embeddings,
    Generation,
    PushingGeneration,
    Runtime,
    RuntimeDescription,
    RuntimeFailure,
    RuntimeUnloaded,
    SamplingParams,
    collect,
)
from edgefleet.agent.runtimes.lora import LoraInfo, LoraRuntime, UnknownLora
from edgefleet.agent.runtimes.memory_budget import MemoryBudget

log = logging.getLogger(__name__)


class KeepAliveRuntime:
    """Holds ``inner`` while it is used, unloads it ``keep_alive_s`` after the last use ends
    (never, when None) or when ``budget`` evicts it, and calls ``reload`` (through the budget)
    when a request arrives for an unloaded model."""

    def __init__(
        self,
        inner: Runtime,
        *,
        reload: Callable[[], Runtime],
        keep_alive_s: float | None,
        budget: MemoryBudget | None = None,
        footprint_bytes: int = 0,
    ) -> None:
        if keep_alive_s is not None and keep_alive_s <= 0:
            raise ValueError("keep_alive_s must be positive")
        self._inner: Runtime | None = inner
        self._reload = reload
        self._keep_alive_s = keep_alive_s
        self._budget = budget
        self._footprint_bytes = footprint_bytes
        self._description = inner.describe()
        self._lock = threading.Lock()
        self._in_use = 0
        self._last_used = time.monotonic()
        self._closed = False
        self._loras: dict[str, LoraInfo] = {}  # adapters over the model, loaded again with it
        self._lora_bytes = 0  # their files' sizes, summed (read without the lock)
        self._idle = threading.Event()
        self._reaper_lock = threading.Lock()  # not self._lock: that one is held across a reload
        self._reaping = False
        if keep_alive_s is not None:
            self._start_reaper()
        if budget is not None:
            budget.join(self)

    @property
    def loaded(self) -> bool:
        return self._inner is not None

    @property
    def name(self) -> str:
        return self._description.model_id

    @property
    def footprint_bytes(self) -> int:
        """The model's estimate plus its adapters' files (their weights take about as much)."""
        return self._footprint_bytes + self._lora_bytes

    @property
    def last_used(self) -> float:
        return self._last_used

    @property
    def keep_alive_s(self) -> float | None:
        return self._keep_alive_s

    @keep_alive_s.setter
    def keep_alive_s(self, value: float | None) -> None:
        """Changes the keep-alive of a loaded or unloaded model (a signed device config does),
        from the next check on: an idle time already past the new value unloads within a second.
        Never waits for a load in progress, so the caller's event loop does not stall."""
        if value is not None and value <= 0:
            raise ValueError("keep_alive_s must be positive")
        self._keep_alive_s = value
        if value is not None:
            self._start_reaper()

    def _start_reaper(self) -> None:
        with self._reaper_lock:
            if self._reaping or self._closed:
                return
            self._reaping = True
        threading.Thread(target=self._reap, name="edgefleet-keep-alive", daemon=True).start()

    def describe(self) -> RuntimeDescription:
        return self._description

    # -- the protocol ---------------------------------------------------------------------

    def chat(self, messages: Sequence[ChatMessage], params: SamplingParams) -> Completion:
        return collect(self.chat_stream(messages, params))

    def complete(self, prompt: str, params: SamplingParams) -> Completion:
        return collect(self.complete_stream(prompt, params))

    def chat_stream(self, messages: Sequence[ChatMessage], params: SamplingParams) -> Generation:
        return self._generation(lambda runtime: runtime.chat_stream(messages, params))

    def complete_stream(self, prompt: str, params: SamplingParams) -> Generation:
        return self._generation(lambda runtime: runtime.complete_stream(prompt, params))

    def embed(self, texts: Sequence[str]) -> Embeddings:
        runtime = self._acquire()
        try:
            return runtime.embed(texts)
        finally:
            self._release()

    def smoke_test(self) -> None:
        runtime = self._acquire()
        try:
            runtime.smoke_test()
        finally:
            self._release()

    def unload(self) -> None:
        with self._lock:
            self._closed = True
            inner, self._inner = self._inner, None
        self._idle.set()
        if self._budget is not None:
            self._budget.leave(self)
        if inner is not None:
            inner.unload()

    def try_evict(self) -> bool:
        """Unload now if nobody uses the model (it loads again on its next request); never
        waits, so a budget evicting on another model's behalf cannot deadlock with this one."""
        if not self._lock.acquire(blocking=False):
            return False  # loading, or a request is just taking it
        try:
            if self._in_use or self._inner is None:
                return False
            inner, self._inner = self._inner, None
        finally:
            self._lock.release()
        inner.unload()
        return True

    # -- LoRA adapters, kept across unloads -----------------------------------------------

    def load_lora(self, name: str, path: Path) -> LoraInfo:
        """Loads the model first if it was unloaded: an adapter is checked against its base."""
        runtime = self._acquire()
        try:
            info = self._lora_runtime(runtime).load_lora(name, path)
            with self._lock:
                self._loras[name] = info
                self._lora_bytes = sum(known.size_bytes for known in self._loras.values())
            return info
        finally:
            self._release()

    def unload_lora(self, name: str) -> None:
        """Never loads the model: an unloaded one forgets the adapter without it."""
        with self._lock:
            known = self._loras.pop(name, None)
            inner = self._inner
            if known is None:
                raise UnknownLora(name, sorted(self._loras))
            self._lora_bytes = sum(kept.size_bytes for kept in self._loras.values())
        if inner is not None:
            # UnknownLora, RuntimeUnloaded: an eviction got there first, and freed it.
            with contextlib.suppress(UnknownLora, RuntimeUnloaded):
                self._lora_runtime(inner).unload_lora(name)

    def loras(self) -> tuple[LoraInfo, ...]:
        with self._lock:
            return tuple(self._loras[name] for name in sorted(self._loras))

    def _lora_runtime(self, runtime: Runtime) -> LoraRuntime:
        if Capability.LORA not in self._description.capabilities or not isinstance(runtime, LoraRuntime):
            raise CapabilityNotSupported(self._description.model_id, Capability.LORA)
        return runtime

    def _load_loras_again(self, runtime: Runtime) -> None:
        """Under ``_lock``, right after a reload; an adapter that no longer loads is dropped."""
        for name, info in list(self._loras.items()):
            try:
                self._lora_runtime(runtime).load_lora(name, info.path)
            except RuntimeFailure as exc:
                log.warning("LoRA adapter %s over %s was not loaded again: %s", name, self.name, exc)
                del self._loras[name]
        self._lora_bytes = sum(kept.size_bytes for kept in self._loras.values())

    # -- use counting ---------------------------------------------------------------------

    def _generation(self, open_: Callable[[Runtime], Generation]) -> Generation:
        runtime = self._acquire()
        try:
            return _Counted(open_(runtime), self._release)
        except BaseException:
            self._release()
            raise

    def _acquire(self) -> Runtime:
        with self._lock:
            if self._closed:
                raise RuntimeUnloaded(f"{self._description.model_id} was unloaded")
            if self._inner is None:
                log.info("loading %s again", self.name)
                if self._budget is None:
                    self._inner = self._reload()
                else:
                    self._inner = self._budget.load(
                        name=self.name,
                        footprint_bytes=self.footprint_bytes,
                        factory=self._reload,
                        requester=self,
                    )
                self._load_loras_again(self._inner)
            self._in_use += 1
            return self._inner

    def _release(self) -> None:
        with self._lock:
            self._in_use -= 1
            self._last_used = time.monotonic()

    def _reap(self) -> None:
        """Runs until the model is unloaded for good; reads the keep-alive afresh at each check,
        so a new value applies without a new thread (None: checks continue, nothing unloads)."""
        while not self._idle.wait(min(self._keep_alive_s or 1.0, 1.0)):
            keep_alive_s = self._keep_alive_s
            if keep_alive_s is None:
                continue
            with self._lock:
                idle = self._in_use == 0 and time.monotonic() - self._last_used >= keep_alive_s
                inner = self._inner if idle else None
                if inner is not None:
                    self._inner = None
            if inner is not None:
                log.info("unloading %s: idle for %.0f s", self.name, keep_alive_s)
                inner.unload()


class _Counted:
    """A generation that tells the keep-alive when it is done (exhausted, failed or closed)."""

    def __init__(self, inner: Generation, done: Callable[[], None]) -> None:
        self._inner = inner
        self._done: Callable[[], None] | None = done

    @property
    def prompt_tokens(self) -> int:
        return self._inner.prompt_tokens

    @property
    def completion_tokens(self) -> int:
        return self._inner.completion_tokens

    def __iter__(self) -> Iterator[Delta]:
        return self

    def __next__(self) -> Delta:
        try:
            return next(self._inner)
        except BaseException:
            self._finish()
            raise

    def stream_to(self, emit: Callable[[Delta], None], cancelled: threading.Event) -> None:
        """Lets a wrapped generation that pushes its own deltas keep doing so (llama.cpp's
        fast path); others are stepped here. The model stays in use until ``close``."""
        if isinstance(self._inner, PushingGeneration):
            self._inner.stream_to(emit, cancelled)
            return
        while not cancelled.is_set():
            try:
                delta = next(self._inner)
            except StopIteration:
                return
            emit(delta)

    def close(self) -> None:
        try:
            self._inner.close()
        finally:
            self._finish()

    def _finish(self) -> None:
        done, self._done = self._done, None
        if done is not None:
            done()
