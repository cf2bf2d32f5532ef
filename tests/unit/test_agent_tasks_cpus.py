"""One count of usable CPUs for the whole agent, with the fallbacks macOS (the MLX target) needs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

from edgefleet.agent import service
from edgefleet.agent.cli import app as agent_app
from edgefleet.agent.config import AgentConfig
from edgefleet.agent.device.hardware import detect_hardware, usable_cpus


def without_affinity(monkeypatch: pytest.MonkeyPatch, cpu_count: int | None) -> None:
    """This interpreter as it is on macOS: no sched_getaffinity, no process_cpu_count (< 3.13)."""
    monkeypatch.delattr(os, "sched_getaffinity", raising=False)
    monkeypatch.delattr(os, "process_cpu_count", raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: cpu_count)


def test_without_sched_getaffinity_every_logical_cpu_counts(monkeypatch: pytest.MonkeyPatch) -> None:
    without_affinity(monkeypatch, cpu_count=6)
    assert usable_cpus() == 6
    assert detect_hardware().usable_cores == 6


def test_an_unknown_cpu_count_still_gives_one_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    without_affinity(monkeypatch, cpu_count=None)
    assert usable_cpus() == 1


def test_the_affinity_mask_wins_over_the_machines_cpus(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delattr(os, "process_cpu_count", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 3}, raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    assert usable_cpus() == 2


def test_process_cpu_count_is_preferred_where_python_has_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "process_cpu_count", lambda: 3, raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3, 4}, raising=False)
    assert usable_cpus() == 3


def test_fleet_agent_run_starts_without_sched_getaffinity(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The CLI sizes inference threads by usable_cpus(), so it no longer breaks on macOS."""
    started: list[AgentConfig] = []
    monkeypatch.setattr(service, "run_agent", started.append)
    without_affinity(monkeypatch, cpu_count=5)
    trust = tmp_path / "trust.json"
    trust.write_text("{}")
    args = ["run", "--controlplane", "127.0.0.1:1", "--trust", str(trust), "--state-dir", str(tmp_path)]
    result = CliRunner().invoke(agent_app, args)
    assert result.exit_code == 0, result.output
    (config,) = started
    assert config.n_threads == 5
