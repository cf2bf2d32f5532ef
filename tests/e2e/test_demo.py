"""`fleetctl demo` is the newcomer's first command: it must run a whole fleet and exit 0."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e
REPO = Path(__file__).resolve().parents[2]


def test_demo_runs_a_fleet_and_exits_zero(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "controlplane.cli", "demo", "--agents", "3", "--workdir", str(tmp_path)],
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
