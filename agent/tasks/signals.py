"""How the agent process stops: SIGTERM/SIGINT on a thread of their own, a graceful stop first,
a deadline after it.

The first signal asks the event loop for a graceful stop (the agent unwinds what it started:
the API gets its grace, in-flight generations are cancelled, telemetry is flushed, models are
unloaded) and arms ``SHUTDOWN_DEADLINE_SECONDS``; a second signal, or the deadline, exits at
once, abandoning work stuck in native code.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable

log = logging.getLogger(__name__)

SHUTDOWN_DEADLINE_SECONDS = 10.0
"""From the first SIGTERM/SIGINT, how long a stop may take before the process exits anyway,
abandoning work stuck in native code (a long tokenization, a generation, an unload)."""


class StopSignals:
    """SIGTERM and SIGINT, heard on a thread of their own whatever the rest is doing.

    The signals are blocked in every thread (set before any other thread starts, inherited by
    all) and taken with ``sigwait`` here: a Python-level handler would wait for the main thread
    to run bytecode, which it does not while native code (a tokenization, a load) holds it. The
    first signal asks for a graceful stop and arms the deadline; a second signal, or the
    deadline, flushes the logs and exits at once.
    """

    SIGNALS = frozenset({signal.SIGINT, signal.SIGTERM})

    def __init__(self, request_stop: Callable[[], None], *, deadline_seconds: float) -> None:
        self._request_stop = request_stop
        self._deadline_seconds = deadline_seconds
        self._thread = threading.Thread(target=self._listen, name="stop-signals", daemon=True)

    def start(self) -> None:
        block_stop_signals()
        self._thread.start()

    def _listen(self) -> None:
        first = signal.sigwait(self.SIGNALS)
        log.info("%s: stopping (at most %.0f s)", signal.Signals(first).name, self._deadline_seconds)
        deadline = threading.Timer(self._deadline_seconds, exit_now, args=("the stop deadline passed",))
        deadline.daemon = True
        deadline.start()
        self._request_stop()
        second = signal.sigwait(self.SIGNALS)
        exit_now(f"a second signal ({signal.Signals(second).name})")


def block_stop_signals() -> None:
    """Blocks SIGTERM and SIGINT in this thread and so in every thread started after it.

    Call it before importing what may start threads at import time (numpy's OpenBLAS pool,
    for one): a thread started with the signals unblocked would be where the kernel delivers
    them, and the stop-signals thread, waiting in ``sigwait``, would never hear the stop.
    """
    signal.pthread_sigmask(signal.SIG_BLOCK, StopSignals.SIGNALS)


def exit_now(why: str) -> None:
    """Ends the process without waiting for threads stuck in native code. Nothing durable is
    lost: state and outbox writes are committed and fsynced as they happen; logs are flushed."""
    log.warning("exiting now: %s; in-flight work is abandoned", why)
    for handler in logging.getLogger().handlers:
        with contextlib.suppress(Exception):
            handler.flush()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(0)


class LateBound:
    """The stop request, bound once the event loop exists; a signal before that exits at once
    (nothing is being served yet)."""

    def __init__(self) -> None:
        self._target: Callable[[], object] | None = None

    def bind(self, target: Callable[[], object]) -> None:
        self._target = target

    def __call__(self) -> None:
        if self._target is None:
            exit_now("stopped before start-up finished")
        else:
            self._target()
