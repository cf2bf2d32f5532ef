"""fleetctl rollout's parsing and printing (controlplane/cli/rollout.py), without a control plane."""

from __future__ import annotations

import pytest
import typer
from rich.console import Console

from edgefleet.controlplane.cli import rollout as cli_rollout
from edgefleet.controlplane.cli.main import app
from edgefleet.protos.fleet.v1 import common_pb2, operator_pb2


def test_waves_parse_as_percentages_or_counts() -> None:
    assert [w.percent for w in cli_rollout.parse_waves("1%,10%,50%,100%")] == [1, 10, 50, 100]
    assert [w.count for w in cli_rollout.parse_waves("1,10,100")] == [1, 10, 100]
    with pytest.raises(typer.BadParameter, match="neither"):
        cli_rollout.parse_waves("1%,lots")


@pytest.mark.parametrize(("text", "seconds"), [("0", 0), ("90", 90), ("30s", 30), ("5m", 300), ("2h", 7200)])
def test_soak_durations(text: str, seconds: int) -> None:
    assert cli_rollout.parse_seconds(text, "--soak") == seconds


def test_selectors_and_labels_parse_repeated_or_comma_separated() -> None:
    assert cli_rollout.parse_pairs(["hw=cpu,region=eu", "tier=a"], "selector") == {
        "hw": "cpu",
        "region": "eu",
        "tier": "a",
    }
    with pytest.raises(typer.Exit):
        cli_rollout.parse_pairs(["nope"], "selector")


def test_the_rollout_commands_are_registered() -> None:
    groups = {g.name: g.typer_instance for g in app.registered_groups}
    rollout = groups["rollout"]
    assert rollout is not None
    assert {c.name for c in rollout.registered_commands} == {
        "create",
        "status",
        "list",
        "pause",
        "resume",
        "abort",
        "rollback",
    }
    devices = groups["devices"]
    assert devices is not None and "label" in {c.name for c in devices.registered_commands}


def test_status_shows_waves_and_devices(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cli_rollout, "Console", lambda: Console(width=200))
    rollout = operator_pb2.Rollout(
        name="eu",
        state=operator_pb2.ROLLOUT_STATE_ROLLED_BACK,
        bundle=common_pb2.BundleRef(name="m", version=2),
        selector={"hw": "cpu"},
        waves=[operator_pb2.WaveSpec(percent=10), operator_pb2.WaveSpec(percent=100)],
        gates=operator_pb2.HealthGates(max_load_failure_rate=0.1),
        reason="wave 1 of 2 failed its gates: load failures 1/1 (100%) above 10%",
        wave_status=[
            operator_pb2.WaveStatus(index=0, devices=1, failed=1, gate_result="failed: load failures 1/1"),
            operator_pb2.WaveStatus(index=1, devices=9),
        ],
        devices=[
            operator_pb2.RolloutDevice(
                device_id="dev-1",
                state=operator_pb2.ROLLOUT_DEVICE_STATE_ROLLED_BACK,
                generation=2,
                reason="load failure: boom; rolled back at generation 3",
                previous_bundle=common_pb2.BundleRef(name="m", version=1),
            )
        ],
    )
    cli_rollout.show(rollout)
    out = capsys.readouterr().out
    assert "eu rolled_back, wave 1 of 2: m@2" in out
    assert "selector hw=cpu; waves 10%,100%" in out and "load failures ≤ 10%" in out
    assert "failed: load failures 1/1" in out
    assert "dev-1" in out and "rolled_back" in out and "m@1" in out
    assert cli_rollout.change_text(operator_pb2.Rollout(config=common_pb2.DeviceConfig(n_threads=4))) == (
        "config: n_threads=4"
    )
