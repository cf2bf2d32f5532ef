"""Which runtime answers requests right now, swapped atomically when a new model goes live.

Requests take a *lease* on the current runtime for as long as they use it (a whole stream
included). `swap()` only changes which runtime new leases get; the old runtime keeps
serving its leased requests. `retire(old)` waits until those are done and then unloads it,
so activating a new model never cuts a response short and never frees a model mid-token.

Safety without `retire`: a runtime's own lock already makes `unload()` wait for the
generation in progress; requests that leased the old runtime but had not started
generating then fail with RuntimeUnloaded (HTTP 503, retryable).
"""

from __future__ import annotations

import threading
import time
from types import TracebackType

from agent.runtimes.base import Runtime


class NoActiveModel(Exception):
    """No model is active yet (first install still running, or the last one failed)."""


class Lease:
    """A request's hold on one runtime; release exactly once (extra releases are no-ops)."""

    __slots__ = ("_owner", "_released", "runtime")

    def __init__(self, owner: ActiveModel, runtime: Runtime) -> None:
        self._owner = owner
        self._released = False
        self.runtime = runtime

    def release(self) -> None:
        self._owner._release(self)

    def __enter__(self) -> Runtime:
        return self.runtime

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()


class ActiveModel:
    """Thread-safe holder of the active runtime, with per-runtime lease counts."""

    def __init__(self, runtime: Runtime | None = None) -> None:
        self._cond = threading.Condition()
        self._runtime = runtime
        self._leases: dict[int, int] = {}  # id(runtime) -> leases outstanding

    def current(self) -> Runtime | None:
        """The runtime new requests would get (may change right after this returns)."""
        with self._cond:
            return self._runtime

    def swap(self, new: Runtime | None) -> Runtime | None:
        """Make `new` the active runtime and return the previous one.

        The caller owns the returned runtime: pass it to `retire()` (or unload it) once it
        no longer wants it. Passing None stops serving (requests get 503).
        """
        with self._cond:
            old, self._runtime = self._runtime, new
            return old

    def lease(self) -> Lease:
        """Take a lease on the active runtime; raises NoActiveModel when there is none."""
        with self._cond:
            if self._runtime is None:
                raise NoActiveModel("no model is loaded")
            key = id(self._runtime)
            self._leases[key] = self._leases.get(key, 0) + 1
            return Lease(self, self._runtime)

    def in_flight(self, runtime: Runtime) -> int:
        """Outstanding leases on `runtime`, for health reports and tests."""
        with self._cond:
            return self._leases.get(id(runtime), 0)

    def wait_idle(self, runtime: Runtime, *, timeout: float | None = None) -> bool:
        """Block until no lease on `runtime` is outstanding; False if `timeout` (seconds) ran out."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while self._leases.get(id(runtime), 0) > 0:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                self._cond.wait(remaining)
            return True

    def retire(self, runtime: Runtime, *, timeout: float | None = None) -> bool:
        """Unload a runtime that `swap()` returned, after its in-flight requests finish.

        Returns False if `timeout` ran out first; it is unloaded anyway (the runtime's lock
        still protects a generation in progress). Refuses to unload the active runtime.
        """
        with self._cond:
            if runtime is self._runtime:
                raise ValueError("cannot retire the active runtime; swap it out first")
        drained = self.wait_idle(runtime, timeout=timeout)
        runtime.unload()
        return drained

    def _release(self, lease: Lease) -> None:
        with self._cond:
            if lease._released:
                return
            lease._released = True
            key = id(lease.runtime)
            left = self._leases.get(key, 0) - 1
            if left > 0:
                self._leases[key] = left
            else:
                self._leases.pop(key, None)
            self._cond.notify_all()
