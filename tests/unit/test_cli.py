"""Command-line behaviour that needs no server: clear errors and machine-readable output."""

from __future__ import annotations

import json
import platform
from pathlib import Path

from typer.testing import CliRunner

from agent.cli import app as agent_app
from controlplane.ca import ca_paths, init_ca
from controlplane.cli import app as fleetctl

runner = CliRunner()


def test_hardware_json() -> None:
    result = runner.invoke(agent_app, ["hardware", "--json"])
    assert result.exit_code == 0, result.output
    profile = json.loads(result.stdout)
    assert profile["arch"] == platform.machine()
    assert profile["ram_total_bytes"] > 0


def test_keys_init_refuses_to_overwrite(tmp_path: Path) -> None:
    first = runner.invoke(fleetctl, ["keys", "init", "--keys-dir", str(tmp_path / "k")])
    assert first.exit_code == 0, first.output
    assert Path(first.stdout.strip()).name == "trust.json"
    again = runner.invoke(fleetctl, ["keys", "init", "--keys-dir", str(tmp_path / "k")])
    assert again.exit_code == 1
    assert "already exist" in again.output


def test_bundle_build_errors_are_specific(tmp_path: Path) -> None:
    runner.invoke(fleetctl, ["keys", "init", "--keys-dir", str(tmp_path / "k")])
    missing = runner.invoke(
        fleetctl,
        [
            "bundle",
            "build",
            str(tmp_path / "nope.gguf"),
            "--name",
            "m",
            "--version",
            "1",
            "-o",
            str(tmp_path / "b"),
            "--keys-dir",
            str(tmp_path / "k"),
        ],
    )
    assert missing.exit_code == 1 and "does not exist" in missing.output
    bad_name = runner.invoke(
        fleetctl,
        [
            "bundle",
            "build",
            str(tmp_path / "nope.gguf"),
            "--name",
            "Bad Name",
            "--version",
            "1",
            "-o",
            str(tmp_path / "b"),
            "--keys-dir",
            str(tmp_path / "k"),
        ],
    )
    assert bad_name.exit_code == 1 and "bundle name" in bad_name.output
    not_gguf = tmp_path / "x.gguf"
    not_gguf.write_bytes(b"not a model")
    garbage = runner.invoke(
        fleetctl,
        [
            "bundle",
            "build",
            str(not_gguf),
            "--name",
            "m",
            "--version",
            "1",
            "-o",
            str(tmp_path / "b"),
            "--keys-dir",
            str(tmp_path / "k"),
        ],
    )
    assert garbage.exit_code == 1 and "GGUF" in garbage.output


def test_deploy_needs_a_target() -> None:
    result = runner.invoke(fleetctl, ["deploy", "m@1"])
    assert result.exit_code == 1 and "--all or --device" in result.output


def test_unreachable_control_plane_is_a_clear_error(tmp_path: Path) -> None:
    init_ca(tmp_path)
    env = {"EDGEFLEET_TLS_CA": str(ca_paths(tmp_path)[1])}
    result = runner.invoke(fleetctl, ["devices", "list", "--controlplane", "127.0.0.1:1"], env=env)
    assert result.exit_code == 1 and "UNAVAILABLE" in result.output


def test_a_missing_ca_certificate_is_a_clear_error(tmp_path: Path) -> None:
    env = {"EDGEFLEET_HOME": str(tmp_path), "EDGEFLEET_TLS_CA": ""}
    result = runner.invoke(fleetctl, ["devices", "list", "--controlplane", "127.0.0.1:1"], env=env)
    assert result.exit_code == 1
    assert f"cannot read the fleet CA certificate {tmp_path}/keys/tls/ca.pem" in result.output
    assert "EDGEFLEET_TLS_CA" in result.output
