"""The control plane's collector settings, applied in a fresh interpreter so this test process
keeps its own."""

from __future__ import annotations

import subprocess
import sys


def test_serving_freezes_what_is_loaded_and_collects_young_objects_less_often() -> None:
    script = (
        "import gc\n"
        "from edgefleet.controlplane.app.collector import YOUNG_THRESHOLD, tune_for_serving\n"
        "before = gc.get_freeze_count()\n"
        "tune_for_serving()\n"
        "assert gc.get_freeze_count() > before + 1000, gc.get_freeze_count()\n"
        "assert gc.get_threshold()[0] == YOUNG_THRESHOLD > 700\n"
        "cycle = []\n"
        "cycle.append(cycle)\n"
        "del cycle\n"
        "assert gc.collect() >= 1  # cycles made afterwards are still collected\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
