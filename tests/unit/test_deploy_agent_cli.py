"""`fleet-agent run --controlplane` with several replicas: a list gRPC can resolve is accepted, one
it cannot is refused before the agent starts, naming the option."""

from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner

from edgefleet.agent.cli import app as agent_app


def _run(tmp_path: Path, *args: str) -> str:
    result = CliRunner().invoke(
        agent_app,
        ["run", *args, "--trust", str(tmp_path / "missing.json"), "--state-dir", str(tmp_path)],
        env={"COLUMNS": "250"},
        terminal_width=250,
    )
    assert result.exit_code == 2, result.output  # usage errors only: nothing started
    return result.output


def test_a_list_of_names_is_refused(tmp_path: Path) -> None:
    output = _run(tmp_path, "--controlplane", "a.example:7443,b.example:7443")
    assert "Invalid value for --controlplane" in output


def test_a_list_of_different_hosts_is_refused(tmp_path: Path) -> None:
    """Their certificates share no address the TLS check could use: a DNS name is the way."""
    output = _run(tmp_path, "--controlplane", "10.0.0.1:7443,10.0.0.2:7443")
    assert "Invalid value for --controlplane" in output


def test_a_list_of_one_hosts_ports_passes(tmp_path: Path) -> None:
    output = _run(tmp_path, "--controlplane", "127.0.0.1:7443,127.0.0.1:17443")
    assert "Invalid value for --controlplane" not in output
    assert "trust file" in output
