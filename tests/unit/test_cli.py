"""Command-line behaviour that needs no server: clear errors and machine-readable output."""

from __future__ import annotations

import json
import platform
from pathlib import Path

from rich.console import Console
from typer.testing import CliRunner

from edgefleet.agent.cli import app as agent_app
from edgefleet.controlplane.cli import tables as fleet_table
from edgefleet.controlplane.cli.main import app as fleetctl
from edgefleet.controlplane.trust.ca import ca_paths, init_ca
from edgefleet.protos.fleet.v1 import common_pb2

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


def test_deploy_help_says_a_deployment_adds_or_replaces_a_model() -> None:
    result = runner.invoke(fleetctl, ["deploy", "--help"], env={"COLUMNS": "200"})
    text = " ".join(result.output.split())
    assert "adds the model, or replaces the release of NAME it holds" in text
    assert "fleetctl undeploy NAME removes one" in text.replace("`", "")


def test_undeploy_needs_exactly_one_target_and_a_name() -> None:
    for args in (["undeploy", "m"], ["undeploy", "m", "--all", "--device", "dev-1"]):
        result = runner.invoke(fleetctl, args)
        assert result.exit_code == 1 and "exactly one of --all, --device ID or --selector" in result.output
    release = runner.invoke(fleetctl, ["undeploy", "m@1", "--all"])
    assert release.exit_code == 1 and "bundle NAME" in release.output
    selector = runner.invoke(fleetctl, ["undeploy", "m", "--selector", "hw=jetson,site"])
    assert selector.exit_code == 1 and "'site' is not KEY=VALUE" in selector.output


def summary_with_models() -> common_pb2.DeviceSummary:
    return common_pb2.DeviceSummary(
        device_id="dev-1",
        state=common_pb2.DEVICE_STATE_ACTIVE,
        active_bundle=common_pb2.BundleRef(name="beta", version=2),
        desired_bundle=common_pb2.BundleRef(name="beta", version=2),
        variant="gguf-q8_0",
        desired_models=[
            common_pb2.BundleRef(name="alpha", version=1),
            common_pb2.BundleRef(name="beta", version=2),
        ],
        models=[
            common_pb2.InstalledModel(
                bundle=common_pb2.BundleRef(name="alpha", version=1), variant="gguf-q4_0", loaded=True
            ),
            common_pb2.InstalledModel(
                bundle=common_pb2.BundleRef(name="beta", version=2), variant="gguf-q8_0"
            ),
        ],
    )


def test_devices_list_shows_every_model_a_device_holds() -> None:
    console = Console(record=True, width=250)
    console.print(
        fleet_table.devices_table([summary_with_models(), common_pb2.DeviceSummary(device_id="dev-2")])
    )
    lines = console.export_text().splitlines()
    assert any("alpha@1 gguf-q4_0 loaded" in line and "dev-1" in line for line in lines)
    assert any("beta@2 gguf-q8_0 unloaded" in line for line in lines)
    older = common_pb2.DeviceSummary(  # an agent that reports no model list
        device_id="dev-3", active_bundle=common_pb2.BundleRef(name="gamma", version=4), variant="gguf-q5_1"
    )
    console = Console(record=True, width=250)
    console.print(fleet_table.devices_table([older]))
    assert "gamma@4 gguf-q5_1" in console.export_text()

    rows = fleet_table.devices_json([summary_with_models()])
    assert rows[0]["models"] == [
        {"bundle": "alpha@1", "variant": "gguf-q4_0", "loaded": True},
        {"bundle": "beta@2", "variant": "gguf-q8_0", "loaded": False},
    ]
    assert rows[0]["desired_models"] == ["alpha@1", "beta@2"]
    assert (rows[0]["active_bundle"], rows[0]["desired_bundle"], rows[0]["variant"]) == (
        "beta@2",
        "beta@2",
        "gguf-q8_0",
    )


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
