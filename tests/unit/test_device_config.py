"""Device config rules (edgefleet.protos.fleet.device_config), its signed form in the director targets, the
settings it results in on the agent, and its place in the agent's persisted state."""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from securesystemslib.formats import encode_canonical
from tuf.api.metadata import Targets

from edgefleet.agent.config import AgentConfig, EffectiveSettings, LoadSettings, effective_settings
from edgefleet.agent.update.state import AgentState, StateError, load_state, save_state
from edgefleet.controlplane.trust.repositories import director_fields
from edgefleet.protos.fleet import uptane
from edgefleet.protos.fleet.device_config import (
    BOUNDS,
    InvalidConfig,
    config_from_json,
    config_to_json,
    describe_config,
    is_empty,
    validate_config,
)
from edgefleet.protos.fleet.release import MalformedMetadata
from edgefleet.protos.fleet.v1 import common_pb2

GGUF = common_pb2.MODEL_FORMAT_GGUF
Config = common_pb2.DeviceConfig

# (field, lowest allowed, highest allowed, a value below, a value above)
RANGES = [
    ("n_threads", 1, 1024, 0, 1025),
    ("n_ctx", 128, 1_048_576, 127, 1_048_577),
    ("max_running", 1, 64, 0, 65),
    ("max_waiting", 0, 10_000, None, 10_001),  # uint32: nothing below 0 to try
    ("telemetry_interval_seconds", 1, 3600, 0.999, 3600.5),
    ("keep_alive_seconds", 1, 604_800, 0.5, 604_801),
    ("max_download_rate", 1024, 100_000_000_000, 1023, 100_000_000_001),
]


# -- validation ---------------------------------------------------------------------------------


def one(field: str, value: Any) -> common_pb2.DeviceConfig:
    """A config setting only ``field``."""
    config = Config()
    setattr(config, field, value)
    return config


def test_the_bounds_table_covers_every_numeric_field_of_the_message() -> None:
    numeric = {f.name for f in Config.DESCRIPTOR.fields if f.name not in ("pin", "mirrors")}
    assert {b.field for b in BOUNDS} == numeric
    assert [r[0] for r in RANGES] == [b.field for b in BOUNDS]


@pytest.mark.parametrize(("field", "low", "high", "below", "above"), RANGES)
def test_each_field_accepts_its_range_and_refuses_what_lies_outside(
    field: str, low: float, high: float, below: float | None, above: float
) -> None:
    for value in (low, high, (low + high) / 2 if isinstance(low, float) else low + 1):
        validate_config(one(field, value))
    for bad in (below, above):
        if bad is None:
            continue
        with pytest.raises(InvalidConfig) as raised:
            validate_config(one(field, bad))
        assert raised.value.field == field
        message = str(raised.value)
        assert message.startswith(f"{field}: must be ") and f"{low}..{high}" in message


@pytest.mark.parametrize("field", ["telemetry_interval_seconds", "keep_alive_seconds"])
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, -1.0])
def test_durations_must_be_finite_and_positive(field: str, value: float) -> None:
    with pytest.raises(InvalidConfig, match=f"^{field}: must be"):
        validate_config(one(field, value))


def test_keep_alive_zero_means_never_and_is_allowed_where_other_zeros_are_not() -> None:
    validate_config(Config(keep_alive_seconds=0))
    with pytest.raises(InvalidConfig, match=r"keep_alive_seconds: must be 0 \(never unload\) or 1\.\.604800"):
        validate_config(Config(keep_alive_seconds=0.25))
    validate_config(Config(max_waiting=0))  # no waiting line at all: 429 when every slot runs
    for field in ("n_threads", "n_ctx", "max_running", "telemetry_interval_seconds"):
        with pytest.raises(InvalidConfig, match=f"^{field}:"):
            validate_config(one(field, 0))


def test_download_rate_zero_means_unlimited() -> None:
    validate_config(Config(max_download_rate=0))
    with pytest.raises(InvalidConfig, match=r"^max_download_rate: must be 0 \(unlimited\) or 1024\.\."):
        validate_config(Config(max_download_rate=1))


def test_mirrors_are_a_short_list_of_plain_http_base_urls() -> None:
    good = ["http://mirror.local:8080/blobs", "https://cdn.example.com", "http://[::1]:81/a/b/"]
    validate_config(Config(mirrors=good))
    validate_config(Config(mirrors=[f"http://m{i}.local" for i in range(8)]))
    refused = {
        "mirrors": [[f"http://m{i}.local" for i in range(9)], ["http://a", "http://a"]],
        "mirrors[0]": [
            ["ftp://mirror.local"],
            ["mirror.local/blobs"],
            ["http://"],
            ["http://user:secret@mirror.local"],
            ["http://mirror.local/?x=1"],
            ["http://mirror.local/#top"],
            ["http://mirror.local:99999"],
            ["http://mirror .local"],
            ["http://mirror.local/\n"],
            ["http://m.local/" + "a" * 500],
        ],
    }
    for field, cases in refused.items():
        for mirrors in cases:
            with pytest.raises(InvalidConfig) as raised:
                validate_config(Config(mirrors=mirrors))
            assert raised.value.field == field, mirrors


def test_mirrors_and_rate_travel_as_json_and_reach_the_settings(tmp_path: Path) -> None:
    config = Config(mirrors=["http://a.local", "https://b.local/x"], max_download_rate=1 << 20)
    assert config_from_json(json.loads(json.dumps(config_to_json(config)))) == config
    assert "mirrors=http://a.local,https://b.local/x" in describe_config(config)
    settings = effective_settings(agent_config(tmp_path), config)
    assert settings.mirrors == ("http://a.local", "https://b.local/x")
    assert settings.max_download_rate == 1 << 20
    assert effective_settings(agent_config(tmp_path), Config(n_ctx=512)).mirrors == ()


def test_unset_fields_and_the_empty_config_are_valid() -> None:
    validate_config(Config())
    assert is_empty(Config()) and is_empty(None)
    assert not is_empty(Config(max_waiting=0))  # set to zero is set


def test_the_first_bad_field_is_named() -> None:
    with pytest.raises(InvalidConfig, match=r"^n_ctx: must be 128\.\.1048576, got 64$"):
        validate_config(Config(n_threads=4, n_ctx=64, max_running=0))


def test_a_pin_names_exactly_one_of_a_variant_and_a_known_format() -> None:
    validate_config(Config(pin=common_pb2.VariantPin(variant_id="gguf-q4_1", scope="device")))
    validate_config(Config(pin=common_pb2.VariantPin(format=common_pb2.MODEL_FORMAT_MLX)))
    with pytest.raises(InvalidConfig, match=r"^pin: .*exactly one.*both are set"):
        validate_config(Config(pin=common_pb2.VariantPin(variant_id="gguf-q4_1", format=GGUF)))
    empty = Config()
    empty.pin.SetInParent()  # present but naming nothing: refused, not read as "no pin"
    with pytest.raises(InvalidConfig, match=r"^pin: .*neither is set"):
        validate_config(empty)
    with pytest.raises(InvalidConfig, match=r"^pin: "):
        validate_config(Config(pin=common_pb2.VariantPin(scope="device")))
    unknown = Config()
    unknown.pin.format = 42  # type: ignore[assignment]  # an enum value this build does not know
    with pytest.raises(
        InvalidConfig, match=r"^pin.format: must be a known format .*MODEL_FORMAT_GGUF.*got 42"
    ):
        validate_config(unknown)


# -- storage form -------------------------------------------------------------------------------


def full_config() -> common_pb2.DeviceConfig:
    return Config(
        n_threads=2,
        n_ctx=4096,
        max_running=2,
        max_waiting=0,
        telemetry_interval_seconds=2.5,
        keep_alive_seconds=0,
        pin=common_pb2.VariantPin(format=GGUF, scope="device"),
    )


def test_json_round_trip_keeps_which_fields_are_set() -> None:
    config = full_config()
    raw = config_to_json(config)
    assert raw == {
        "nThreads": 2,
        "nCtx": 4096,
        "maxRunning": 2,
        "maxWaiting": 0,
        "telemetryIntervalSeconds": "2.5",  # canonical JSON (what TUF signs) has no floats
        "keepAliveSeconds": "0.0",
        "pin": {"format": "MODEL_FORMAT_GGUF", "scope": "device"},
    }
    assert json.loads(json.dumps(raw)) == raw  # storable as JSON as is
    assert encode_canonical(raw) is not None  # and signable
    back = config_from_json(raw)
    assert back == config and back.HasField("max_waiting") and back.HasField("keep_alive_seconds")
    assert config_to_json(Config()) == {}
    assert not config_from_json({}).ListFields()
    odd = Config(telemetry_interval_seconds=1 / 3, keep_alive_seconds=math.nan)
    assert config_from_json(config_to_json(odd)).telemetry_interval_seconds == 1 / 3  # exact
    assert math.isnan(config_from_json(config_to_json(odd)).keep_alive_seconds)
    assert config_from_json({"keepAliveSeconds": 300}).keep_alive_seconds == 300.0  # numbers read too


@pytest.mark.parametrize(
    "raw",
    [{"nCtx": "lots"}, {"nCtx": -1}, {"nCtx": 2**33}, {"noSuchSetting": 1}, {"pin": "gguf"}, ["nCtx"]],
)
def test_reading_something_that_is_no_config_is_a_typed_error(raw: Any) -> None:
    with pytest.raises(InvalidConfig) as raised:
        config_from_json(raw)
    assert raised.value.field == "config"


def test_a_config_is_described_in_one_line() -> None:
    assert describe_config(None) == "no device config"
    text = describe_config(
        Config(n_ctx=1_048_576, keep_alive_seconds=604800, pin={"variant_id": "gguf-q8_0"})
    )
    assert text == "n_ctx=1048576, keep_alive_seconds=604800, pin=gguf-q8_0"


# -- signed in the director targets -------------------------------------------------------------


def signed_targets(fields: dict[str, Any]) -> Targets:
    return Targets(version=1, expires=datetime.now(UTC) + timedelta(days=1), unrecognized_fields=fields)


def test_director_fields_carry_a_config_that_parses_back() -> None:
    config = full_config()
    fields = director_fields("dev-1", 7, [("smollm2", 1)], None, config)
    assert fields[uptane.CUSTOM_KEY]["config"] == config_to_json(config)
    assignment = uptane.parse_director_targets(signed_targets(fields))
    assert assignment.config == config and assignment.pin is None
    # Through the serialized metadata, as a device reads it.
    again = Targets.from_dict(json.loads(json.dumps(signed_targets(fields).to_dict())))
    assert uptane.parse_director_targets(again).config == config


def test_no_config_or_an_empty_one_is_not_signed() -> None:
    for config in (None, Config()):
        fields = director_fields("dev-1", 7, [("smollm2", 1)], None, config)
        assert "config" not in fields[uptane.CUSTOM_KEY]
        assert uptane.parse_director_targets(signed_targets(fields)).config is None


def test_director_pin_and_config_pin_travel_side_by_side() -> None:
    pin = common_pb2.VariantPin(variant_id="gguf-q4_1", scope="device")
    config = Config(pin=common_pb2.VariantPin(format=GGUF))
    assignment = uptane.parse_director_targets(
        signed_targets(director_fields("dev-1", 7, [("smollm2", 1)], pin, config))
    )
    assert (assignment.pin, assignment.config) == (pin, config)


@pytest.mark.parametrize(
    "bad",
    ["n_ctx=4096", ["nCtx", 4096], {"nCtx": "4096 tokens"}, {"nCtx": -4096}, {"contextWindow": 4096}],
)
def test_a_malformed_config_field_is_malformed_metadata(bad: object) -> None:
    fields = director_fields("dev-1", 7, [("smollm2", 1)], None, None)
    fields[uptane.CUSTOM_KEY]["config"] = bad
    with pytest.raises(MalformedMetadata, match="malformed 'edgefleet' field"):
        uptane.parse_director_targets(signed_targets(fields))


def test_an_out_of_range_config_parses_for_the_agent_to_refuse() -> None:
    """Ranges are the agent's to check (agent/update/updater.py signed_config): the report then says
    which setting was refused, not merely "malformed"."""
    fields = director_fields("dev-1", 7, [("smollm2", 1)], None, None)
    fields[uptane.CUSTOM_KEY]["config"] = {"nCtx": 64}
    assert uptane.parse_director_targets(signed_targets(fields)).config == Config(n_ctx=64)


# -- the settings in force on the agent ---------------------------------------------------------


def agent_config(tmp_path: Path, **overrides: Any) -> AgentConfig:
    base: dict[str, Any] = {
        "controlplane": "127.0.0.1:1",
        "state_dir": tmp_path,
        "trust_path": tmp_path / "trust.json",
        "n_ctx": 2048,
        "n_threads": None,
        "max_running_requests": 1,
        "max_waiting_requests": 16,
        "telemetry_interval_seconds": 15.0,
        "keep_alive_seconds": 300.0,
    }
    return AgentConfig(**{**base, **overrides})


def test_without_a_config_the_command_line_rules(tmp_path: Path) -> None:
    settings = effective_settings(agent_config(tmp_path), None)
    assert settings == EffectiveSettings(
        n_ctx=2048,
        n_threads=None,
        max_running_requests=1,
        max_waiting_requests=16,
        telemetry_interval_seconds=15.0,
        keep_alive_seconds=300.0,
    )
    assert effective_settings(agent_config(tmp_path), Config()) == settings
    assert settings.load == LoadSettings(n_ctx=2048, n_threads=None)


def test_each_field_the_config_sets_overrides_only_that_setting(tmp_path: Path) -> None:
    cli = agent_config(tmp_path)
    assert effective_settings(cli, Config(n_ctx=512)) == EffectiveSettings(
        n_ctx=512,
        n_threads=None,
        max_running_requests=1,
        max_waiting_requests=16,
        telemetry_interval_seconds=15.0,
        keep_alive_seconds=300.0,
    )
    everything = effective_settings(cli, full_config())
    assert everything == EffectiveSettings(
        n_ctx=4096,
        n_threads=2,
        max_running_requests=2,
        max_waiting_requests=0,  # set to 0 overrides, unlike an unset field
        telemetry_interval_seconds=2.5,
        keep_alive_seconds=None,  # 0: never unload, as without --keep-alive
    )
    assert effective_settings(cli, Config(keep_alive_seconds=60)).keep_alive_seconds == 60.0
    no_keep_alive = agent_config(tmp_path, keep_alive_seconds=None)
    assert effective_settings(no_keep_alive, Config(keep_alive_seconds=90)).keep_alive_seconds == 90.0


# -- persisted in the agent state ----------------------------------------------------------------


def test_the_config_in_force_survives_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    state = AgentState(applied_generation=3).with_config(full_config())
    save_state(path, state)
    loaded = load_state(path)
    assert loaded == state
    assert loaded.config_in_force() == full_config()
    assert json.loads(path.read_text())["device_config"]["nCtx"] == 4096
    cleared = loaded.with_config(None)
    save_state(path, cleared)
    assert load_state(path).config_in_force() is None
    assert load_state(path).with_config(Config()).device_config == {}


def test_state_files_from_before_device_configs_load_without_one(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    path.write_text(json.dumps({"phase": 6, "desired_generation": 2, "applied_generation": 2, "models": []}))
    assert load_state(path).config_in_force() is None


@pytest.mark.parametrize("bad", [{"nCtx": "big"}, {"unknownSetting": 1}, "nCtx=1"])
def test_a_corrupt_stored_config_is_a_state_error(tmp_path: Path, bad: object) -> None:
    path = tmp_path / "state.json"
    path.write_text(
        json.dumps({"phase": 6, "desired_generation": 2, "applied_generation": 2, "device_config": bad})
    )
    with pytest.raises(StateError, match="malformed"):
        load_state(path)
