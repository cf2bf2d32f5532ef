"""`fleetctl demo` is the newcomer's first command: it must run a whole fleet and exit 0."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest

pytestmark = pytest.mark.e2e
REPO = Path(__file__).resolve().parents[2]
DEMO = [sys.executable, "-m", "edgefleet.controlplane.cli", "demo"]


def test_demo_runs_a_fleet_and_exits_zero(tmp_path: Path) -> None:
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "edgefleet.controlplane.cli",
            "demo",
            "--agents",
            "3",
            "--workdir",
            str(tmp_path),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        env={"COLUMNS": "200", "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)},
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    out = done.stdout
    assert out.count("Paris") >= 3, out
    assert out.count("http://127.0.0.1:") >= 6, "each agent's base URL and API column"
    assert "demo wall time" in out
    assert len(list(tmp_path.glob("agent-*/artifacts/*"))) == 3, "each agent installed the verified model"


def _start_demo(tmp_path: Path, *extra: str) -> tuple[subprocess.Popen[bytes], Path]:
    out = tmp_path / "demo.out"
    demo = subprocess.Popen(
        [*DEMO, "--agents", "1", "--workdir", str(tmp_path), *extra],
        cwd=REPO,
        stdout=out.open("wb"),
        stderr=subprocess.STDOUT,
        env={"COLUMNS": "200", "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)},
    )
    return demo, out


def _wait_until(what: str, probe: Callable[[], bool], demo: subprocess.Popen[bytes], out: Path) -> None:
    deadline = time.monotonic() + 300
    while not probe():
        assert demo.poll() is None, f"demo exited early while waiting for {what}: {out.read_text()[-4000:]}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}: {out.read_text()[-4000:]}"
        time.sleep(0.2)


def _children(demo: subprocess.Popen[bytes]) -> list[psutil.Process]:
    return psutil.Process(demo.pid).children(recursive=True)


def _assert_all_gone(processes: list[psutil.Process]) -> None:
    """Every process has ended (waited for generously: this checks that they end, not how fast)."""
    _, alive = psutil.wait_procs(processes, timeout=60)
    for proc in alive:
        proc.kill()
    assert not alive, f"left running: {[p.cmdline() for p in alive]}"


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT])
def test_a_running_demo_stopped_by_a_signal_stops_every_process(tmp_path: Path, signum: int) -> None:
    demo, out = _start_demo(tmp_path, "--keep-running")
    _wait_until("the fleet to be up", lambda: "fleet is up" in out.read_text(), demo, out)
    children = _children(demo)
    assert len(children) >= 2, "a control plane and an agent"
    demo.send_signal(signum)
    assert demo.wait(timeout=120) == 0, out.read_text()[-4000:]
    _assert_all_gone(children)


def test_a_demo_stopped_while_starting_stops_every_process(tmp_path: Path) -> None:
    demo, out = _start_demo(tmp_path)
    _wait_until("an agent process", lambda: len(_children(demo)) >= 2, demo, out)
    children = _children(demo)
    demo.send_signal(signal.SIGTERM)
    assert demo.wait(timeout=120) == 1, "stopped before it finished: not a success"
    assert "stopped by SIGTERM" in out.read_text()
    _assert_all_gone(children)


def test_children_do_not_outlive_a_killed_demo(tmp_path: Path) -> None:
    demo, out = _start_demo(tmp_path)
    _wait_until("an agent process", lambda: len(_children(demo)) >= 2, demo, out)
    children = _children(demo)
    demo.kill()
    demo.wait(timeout=30)
    _assert_all_gone(children)
