"""Ollama's `options` onto the runtime's SamplingParams: what maps, what is refused, and why."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from edgefleet.agent.api.ollama.options import (
    DEFAULT_TEMPERATURE,
    DEFAULT_TOP_K,
    DEFAULT_TOP_P,
    FLEET_SET,
    NEUTRAL,
    UNSUPPORTED,
    OllamaOptions,
    WindowTooSmall,
)
from edgefleet.agent.api.protocol import MAX_STOP_SEQUENCES
from edgefleet.agent.runtimes.base import SamplingParams


def options(**values: Any) -> OllamaOptions:
    return OllamaOptions.model_validate(values)


def refusal(**values: Any) -> str:
    with pytest.raises(ValidationError) as raised:
        options(**values)
    return str(raised.value)


def test_omitted_options_take_ollamas_defaults() -> None:
    params = options().sampling_params()
    assert params == SamplingParams(
        max_tokens=None, temperature=DEFAULT_TEMPERATURE, top_p=DEFAULT_TOP_P, top_k=DEFAULT_TOP_K
    )
    assert (DEFAULT_TEMPERATURE, DEFAULT_TOP_P, DEFAULT_TOP_K) == (0.8, 0.9, 40)


def test_mapped_options() -> None:
    params = options(
        temperature=0,
        top_p=0.5,
        top_k=7,
        seed=2**40 + 5,
        num_predict=12,
        stop=["\n", "User:"],
        frequency_penalty=0.5,
        presence_penalty=-0.25,
    ).sampling_params()
    assert params.temperature == 0.0 and params.top_p == 0.5 and params.top_k == 7
    assert params.seed == 5  # the runtimes take the low 32 bits
    assert params.max_tokens == 12
    assert params.stop == ("\n", "User:")
    assert (params.frequency_penalty, params.presence_penalty) == (0.5, -0.25)


@pytest.mark.parametrize("num_predict", [-1, -2])
def test_num_predict_unlimited_runs_to_the_window(num_predict: int) -> None:
    assert options(num_predict=num_predict).sampling_params().max_tokens is None


def test_negative_seed_is_a_fresh_random_one() -> None:
    assert options(seed=-1).sampling_params().seed is None


def test_integral_floats_are_integers() -> None:
    """JSON has one number type: 16.0 is 16 where an integer is expected, 16.5 is not."""
    assert options(num_predict=16.0).sampling_params().max_tokens == 16
    assert "num_predict" in refusal(num_predict=16.5)


def test_nulls_are_absent() -> None:
    assert (
        options(temperature=None, num_thread=None, min_p=None).sampling_params()
        == options().sampling_params()
    )


def test_unknown_option_is_refused_by_name() -> None:
    assert "unknown option 'no_such_option'" in refusal(no_such_option=1)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("temperature", "0.5"),
        ("top_k", 1.5),
        ("seed", "42"),
        ("stop", "\n"),  # Ollama's stop is a list
        ("stop", [1, 2]),
        ("num_ctx", True),
        ("temperature", True),
    ],
)
def test_bad_types_are_refused(name: str, value: Any) -> None:
    assert name in refusal(**{name: value})


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("temperature", 2.5),
        ("temperature", -0.1),
        ("top_p", 1.5),
        ("top_k", -1),
        ("num_predict", 0),
        ("num_predict", -3),
        ("frequency_penalty", 3),
        ("num_ctx", 0),
    ],
)
def test_out_of_range_values_are_refused(name: str, value: Any) -> None:
    assert name in refusal(**{name: value})


def test_too_many_stops_are_refused() -> None:
    assert "stop" in refusal(stop=["x"] * (MAX_STOP_SEQUENCES + 1))


@pytest.mark.parametrize("name", sorted(FLEET_SET))
def test_load_time_options_are_the_fleets(name: str) -> None:
    value: Any = True if name in ("numa", "low_vram", "f16_kv", "logits_all", "vocab_only") else 2
    if name in ("use_mmap", "use_mlock", "embedding_only"):
        value = True
    assert "set by the fleet" in refusal(**{name: value})


@pytest.mark.parametrize("name", sorted(UNSUPPORTED))
def test_unsupported_samplers_are_refused(name: str) -> None:
    value: Any = True if name == "penalize_newline" else 1
    assert "not supported" in refusal(**{name: value})


@pytest.mark.parametrize(("name", "neutral"), sorted(NEUTRAL.items()))
def test_neutral_only_options(name: str, neutral: float) -> None:
    assert options(**{name: neutral}).sampling_params() == options().sampling_params()
    assert "can only be" in refusal(**{name: neutral + 1})


def test_num_ctx_is_checked_against_the_window() -> None:
    options(num_ctx=512).check_window(1024)  # a smaller window is satisfied by the larger one
    options(num_ctx=1024).check_window(1024)
    with pytest.raises(WindowTooSmall) as raised:
        options(num_ctx=4096).check_window(1024)
    assert raised.value.option == "num_ctx" and "1024" in str(raised.value)


def test_schema_says_what_is_accepted() -> None:
    """/openapi.json: refused options accept only null, neutral ones their neutral value."""
    properties = OllamaOptions.model_json_schema()["properties"]
    assert OllamaOptions.model_json_schema()["additionalProperties"] is False
    for name in FLEET_SET | UNSUPPORTED:
        assert properties[name]["anyOf"] == [{"type": "null"}], name
    for name, neutral in NEUTRAL.items():
        assert properties[name]["anyOf"] == [{"const": neutral}, {"type": "null"}], name
    assert properties["num_predict"]["anyOf"][0]["not"] == {"const": 0}
