"""Which runtimes answer requests right now, one per model name, swapped atomically.

A device holds several models (one per bundle name); requests name the model they want.
Requests take a *lease* on a runtime for as long as they use it (a whole stream included).
`put()` only changes which runtime new leases of that name get; the old runtime keeps
serving its leased requests. `retire(old)` waits until those are done and then unloads it,
so activating a new model never cuts a response short and never frees a model mid-token.

Safety without `retire`: a runtime's own lock already makes `unload()` wait for the
generation in progress; requests that leased the old runtime but had not started
generating then fail with RuntimeUnloaded (HTTP 503, retryable).

LoRA adapters loaded over a model are served as models of their own, named
``<model>:<adapter>`` (`lease_model`, `served_names`): the model's lease, and the adapter
for the request's `SamplingParams.lora`. Ollama reads the part after ':' as a tag, one
variant of a model, which is what an adapter is; no adapter may be named "latest".
"""

from __future__ import annotations

import threading
import time
from types import TracebackType

from edgefleet.agent.runtimes.base import Capability, LoraRequest, Runtime
from edgefleet.agent.runtimes.lora import LoraRuntime

ADAPTER_SEPARATOR = ":"  # "<model>:<adapter>" names a LoRA adapter loaded over a model


class NoActiveModel(Exception):
    """No model is loaded yet (first install still running, or every install failed)."""


class ModelNotServed(LookupError):
    """The request names a model this device does not hold."""

    def __init__(self, requested: str, served: list[str]) -> None:
        self.requested = requested
        self.served = served
        listing = ", ".join(f"`{name}`" for name in served)
        super().__init__(f"The model `{requested}` does not exist on this device; it serves {listing}.")


class Lease:
    """A request's hold on one runtime; release exactly once (extra releases are no-ops)."""

    __slots__ = ("_owner", "_released", "runtime")

    def __init__(self, owner: ModelTable, runtime: Runtime) -> None:
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


class ModelTable:
    """Thread-safe map of model name to runtime, with per-runtime lease counts.

    A runtime's name is its ``describe().model_id`` (the bundle name), which is what the
    OpenAI ``model`` field of a request names.
    """

    def __init__(self, *runtimes: Runtime) -> None:
        self._cond = threading.Condition()
        self._runtimes: dict[str, Runtime] = {r.describe().model_id: r for r in runtimes}
        self._leases: dict[int, int] = {}  # id(runtime) -> leases outstanding

    def names(self) -> list[str]:
        """The models requests can name, sorted."""
        with self._cond:
            return sorted(self._runtimes)

    def runtimes(self) -> list[Runtime]:
        """Every runtime in the table, by name (the list may be stale right after it returns)."""
        with self._cond:
            return [self._runtimes[name] for name in sorted(self._runtimes)]

    def get(self, name: str) -> Runtime | None:
        with self._cond:
            return self._runtimes.get(name)

    def put(self, runtime: Runtime) -> Runtime | None:
        """Make `runtime` serve its model name and return the runtime it replaced, if any.

        The caller owns the returned runtime: pass it to `retire()` once it no longer wants it.
        """
        name = runtime.describe().model_id
        with self._cond:
            old = self._runtimes.get(name)
            self._runtimes[name] = runtime
            return old

    def remove(self, name: str) -> Runtime | None:
        """Stop serving `name` and return its runtime (the caller retires it)."""
        with self._cond:
            return self._runtimes.pop(name, None)

    def lease(self, name: str) -> Lease:
        """Take a lease on the runtime serving `name`.

        Raises NoActiveModel when nothing is loaded, ModelNotServed when `name` is not here.
        """
        with self._cond:
            runtime = self._runtimes.get(name)
            if runtime is None:
                if not self._runtimes:
                    raise NoActiveModel("no model is loaded")
                raise ModelNotServed(name, sorted(self._runtimes))
            key = id(runtime)
            self._leases[key] = self._leases.get(key, 0) + 1
            return Lease(self, runtime)

    def lease_model(self, name: str) -> tuple[Lease, LoraRequest | None]:
        """Like `lease`; ``<model>:<adapter>`` leases the model and names the adapter to apply.

        Raises NoActiveModel, or ModelNotServed (listing `served_names`) when the model or the
        adapter is not here. The adapter may still be unloaded before the request generates;
        the runtime then refuses it (UnknownLora)."""
        base, separator, adapter = name.partition(ADAPTER_SEPARATOR)
        whole = not separator or not adapter or self.get(name) is not None
        try:
            lease = self.lease(name if whole else base)
        except ModelNotServed as exc:
            raise ModelNotServed(name, self.served_names()) from exc
        if whole:
            return lease, None
        if adapter not in _adapter_names(lease.runtime):
            lease.release()
            raise ModelNotServed(name, self.served_names())
        return lease, LoraRequest(adapter)

    def served_names(self) -> list[str]:
        """Every name `lease_model` takes: the models and their adapters, sorted."""
        names = []
        for runtime in self.runtimes():
            model = runtime.describe().model_id
            names.append(model)
            names.extend(f"{model}{ADAPTER_SEPARATOR}{adapter}" for adapter in _adapter_names(runtime))
        return sorted(names)

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
        """Unload a runtime that `put()` or `remove()` returned, after its in-flight requests finish.

        Returns False if `timeout` ran out first; it is unloaded anyway (the runtime's lock
        still protects a generation in progress). Refuses to unload a runtime still serving.
        """
        with self._cond:
            if any(r is runtime for r in self._runtimes.values()):
                raise ValueError("cannot retire a runtime that still serves; replace or remove it first")
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


def _adapter_names(runtime: Runtime) -> list[str]:
    if Capability.LORA not in runtime.describe().capabilities or not isinstance(runtime, LoraRuntime):
        return []
    return [info.name for info in runtime.loras()]
