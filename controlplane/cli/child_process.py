"""Child processes that never outlive the process that started them.

The demo (and anything else that runs a fleet on one machine) starts the control plane and
agents as separate processes. A service manager stops such a parent with SIGTERM or SIGHUP,
a terminal with SIGINT, the OOM killer or an operator with SIGKILL; in none of these cases may
a control plane or agent be left running as an orphan holding ports and state directories.

Two mechanisms, because neither covers everything alone:

- Signals the parent can catch (SIGTERM, SIGHUP, SIGINT) become a `Stopped` exception in the
  parent's main thread, so its ``finally`` blocks stop the children in order (SIGTERM, then
  SIGKILL after a grace period).
- A parent that dies without running any code (SIGKILL, a crash in C) is covered by the Linux
  parent-death signal: each child asks the kernel, between fork and exec, to be sent SIGTERM
  when its parent dies (``prctl(PR_SET_PDEATHSIG)``). Elsewhere (macOS) only the first
  mechanism applies.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import IO

PR_SET_PDEATHSIG = 1
STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)


class Stopped(BaseException):
    """The parent was asked to stop by a signal; unwinding runs its clean-up.

    A BaseException like KeyboardInterrupt, so `except Exception` on the way out does not
    swallow it.
    """

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _die_with_parent(parent_pid: int) -> None:
    """Runs in the child between fork and exec: SIGTERM us when the parent dies."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    # The parent may have died between fork and prctl: then nobody would ever signal us.
    if os.getppid() != parent_pid:
        os._exit(1)


@contextlib.contextmanager
def stop_signals_raise() -> Iterator[None]:
    """Within the block, SIGTERM/SIGHUP/SIGINT raise `Stopped` in the main thread.

    A second signal while the first is being handled is ignored: the clean-up it interrupts
    is the one that stops the children.
    """
    stopping = False

    def handler(signum: int, _frame: FrameType | None) -> None:
        nonlocal stopping
        if stopping:
            return
        stopping = True
        raise Stopped(signum)

    previous = {signum: signal.signal(signum, handler) for signum in STOP_SIGNALS}
    try:
        yield
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)


@dataclass
class Processes:
    """Child processes tied to this one; stopped in reverse order with SIGTERM, then SIGKILL."""

    grace_seconds: float = 10.0
    children: list[tuple[str, subprocess.Popen[bytes], IO[bytes]]] = field(default_factory=list)

    def start(self, name: str, args: Sequence[str], log_path: Path) -> subprocess.Popen[bytes]:
        log = log_path.open("wb")
        parent = os.getpid()
        preexec = (lambda: _die_with_parent(parent)) if sys.platform == "linux" else None
        try:
            # A session of its own: a Ctrl-C in the terminal reaches only us, and we stop the
            # children in order instead of all of them at once.
            proc = subprocess.Popen(
                list(args), stdout=log, stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=preexec
            )
        except BaseException:
            log.close()
            raise
        self.children.append((name, proc, log))
        return proc

    def exited(self) -> tuple[str, int, str] | None:
        """The first child that has exited: its name, exit code and log path."""
        for name, proc, log in self.children:
            if proc.poll() is not None:
                return name, proc.returncode, log.name
        return None

    def stop(self) -> None:
        # Stopping must finish even if a signal arrives now: block them while we stop.
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        try:
            for _, proc, _ in reversed(self.children):
                if proc.poll() is None:
                    proc.send_signal(signal.SIGTERM)
            for _, proc, log in reversed(self.children):
                try:
                    proc.wait(timeout=self.grace_seconds)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
                log.close()
            self.children.clear()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
