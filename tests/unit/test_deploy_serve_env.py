"""`fleetctl serve` is configurable entirely from the environment, as containers configure it:
every option has an EDGEFLEET_* variable, shown in --help, and every Settings field has an option."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import typer
from typer.core import TyperGroup, TyperOption
from typer.testing import CliRunner

from edgefleet.controlplane.app import server
from edgefleet.controlplane.app.settings import Settings
from edgefleet.controlplane.cli.main import app as fleetctl


def serve_options() -> dict[str, TyperOption]:
    """`fleetctl serve`'s options by parameter name, from the command typer builds."""
    group = typer.main.get_command(fleetctl)
    assert isinstance(group, TyperGroup)
    command = group.commands["serve"]
    return {
        param.name: param
        for param in command.params
        if isinstance(param, TyperOption) and param.name and param.name != "help"
    }


def test_every_serve_option_has_its_own_environment_variable() -> None:
    options = serve_options()
    envvars = {name: option.envvar for name, option in options.items()}

    assert {name: var for name, var in envvars.items() if not isinstance(var, str)} == {}
    assert all(str(var).startswith("EDGEFLEET_") for var in envvars.values()), envvars
    assert len(set(envvars.values())) == len(envvars)
    assert envvars["db"] == "EDGEFLEET_DB"
    assert envvars["keys_dir"] == "EDGEFLEET_KEYS_DIR"
    assert envvars["device_listen"] == "EDGEFLEET_DEVICE_LISTEN"


def test_serve_help_names_every_environment_variable() -> None:
    result = CliRunner().invoke(fleetctl, ["serve", "--help"], env={"COLUMNS": "250"}, terminal_width=250)
    assert result.exit_code == 0, result.output
    missing = [o.envvar for o in serve_options().values() if f"env var: {o.envvar}" not in result.output]
    assert missing == []


@pytest.fixture
def started(monkeypatch: pytest.MonkeyPatch) -> list[tuple[Settings, dict[str, Any]]]:
    """The Settings `fleetctl serve` would start a control plane with (nothing starts)."""
    calls: list[tuple[Settings, dict[str, Any]]] = []

    async def record(settings: Settings, **kwargs: Any) -> None:
        calls.append((settings, kwargs))

    monkeypatch.setattr(server, "serve_forever", record)
    return calls


def test_serve_takes_its_whole_configuration_from_the_environment(
    tmp_path: Path, started: list[tuple[Settings, dict[str, Any]]]
) -> None:
    env = {
        "EDGEFLEET_DB": "postgresql+psycopg://edgefleet@db/edgefleet",
        "EDGEFLEET_LISTEN": "0.0.0.0:17443",
        "EDGEFLEET_DEVICE_LISTEN": "0.0.0.0:17444",
        "EDGEFLEET_DEVICE_ADVERTISE": "devices.example.com:7444",
        "EDGEFLEET_DATA_DIR": str(tmp_path / "data"),
        "EDGEFLEET_KEYS_DIR": str(tmp_path / "keys"),
        "EDGEFLEET_MQTT": "mqtt://cp:secret@broker:1883",
        "EDGEFLEET_MQTT_ADVERTISE": "mqtts://broker.example.com:8883",
        "EDGEFLEET_TLS_SAN": "controlplane.example.com controlplane",
        "EDGEFLEET_DEVICE_CERT_VALIDITY": "12h",
        "EDGEFLEET_CRL_FILE": str(tmp_path / "crl.pem"),
        "EDGEFLEET_TELEMETRY_RETENTION": "2d",
        "EDGEFLEET_ROLLUP_RETENTION": "30d",
        "EDGEFLEET_METRICS_LISTEN": "0.0.0.0:9464",
        "EDGEFLEET_REPLICA_ID": "cp-1",
        "EDGEFLEET_ARTIFACT_CHUNK_BYTES": "65536",
        "EDGEFLEET_DESIRED_STATE_RECHECK_SECONDS": "120",
        "EDGEFLEET_METADATA_REFRESH_SECONDS": "300",
        "EDGEFLEET_ROLLOUT_TICK_SECONDS": "2",
        "EDGEFLEET_LOG_LEVEL": "WARNING",
    }
    result = CliRunner().invoke(fleetctl, ["serve"], env=env)
    assert result.exit_code == 0, result.output

    [(settings, kwargs)] = started
    assert kwargs == {"metrics_listen": "0.0.0.0:9464", "replica_id": "cp-1"}
    assert (settings.db_url, settings.listen, settings.device_listen, settings.device_advertise) == (
        env["EDGEFLEET_DB"],
        "0.0.0.0:17443",
        "0.0.0.0:17444",
        "devices.example.com:7444",
    )
    assert (settings.data_dir, settings.keys_dir, settings.crl_file) == (
        tmp_path / "data",
        tmp_path / "keys",
        tmp_path / "crl.pem",
    )
    assert (settings.mqtt_url, settings.mqtt_advertise_url) == (
        env["EDGEFLEET_MQTT"],
        env["EDGEFLEET_MQTT_ADVERTISE"],
    )
    assert settings.tls_hostnames == ("controlplane.example.com", "controlplane")
    assert settings.device_cert_validity == timedelta(hours=12)
    assert (settings.retention.raw_for, settings.retention.rollups_for) == (
        timedelta(days=2),
        timedelta(days=30),
    )
    assert (
        settings.chunk_size_bytes,
        settings.desired_state_recheck_seconds,
        settings.metadata_refresh_seconds,
        settings.rollout_tick_seconds,
    ) == (65536, 120.0, 300.0, 2.0)


def test_a_flag_wins_over_its_environment_variable(
    tmp_path: Path, started: list[tuple[Settings, dict[str, Any]]]
) -> None:
    result = CliRunner().invoke(
        fleetctl,
        ["serve", "--db", "sqlite:///flag.db", "--data-dir", str(tmp_path)],
        env={"EDGEFLEET_DB": "sqlite:///env.db"},
    )
    assert result.exit_code == 0, result.output
    assert started[0][0].db_url == "sqlite:///flag.db"
