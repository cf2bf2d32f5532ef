"""Function tools through the official `openai` client against a real agent on real SmolLM2:
each tool_choice, calls the client parses, streamed fragments the client assembles, and a
conversation that carries a tool's result back."""

from __future__ import annotations

import json
from typing import Any

import jsonschema
import openai
import pydantic
import pytest

from tests.integration.openai_agent import GET_TIME, MODEL_ID, openai_client, smollm2_runtime

pytestmark = pytest.mark.integration
__all__ = ["openai_client", "smollm2_runtime"]

WEATHER_PARAMETERS = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 40},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
    },
    "required": ["city", "unit"],
    "additionalProperties": False,
}
TOOLS: Any = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Current weather in a city",
            "parameters": WEATHER_PARAMETERS,
        },
    },
    GET_TIME,
]
ASK: Any = [{"role": "user", "content": "What is the weather in Paris?"}]
SETTINGS: dict[str, Any] = {"model": MODEL_ID, "max_tokens": 120, "temperature": 0}


def check_calls(message: Any, names: set[str]) -> None:
    assert message.tool_calls, message
    for call in message.tool_calls:
        assert call.type == "function" and call.id.startswith("call_")
        assert call.function.name in names
        arguments = json.loads(call.function.arguments)
        if call.function.name == "get_weather":
            jsonschema.validate(arguments, WEATHER_PARAMETERS)


def test_required_returns_a_valid_call(openai_client: openai.OpenAI) -> None:
    response = openai_client.chat.completions.create(
        messages=ASK, tools=TOOLS, tool_choice="required", **SETTINGS
    )
    choice = response.choices[0]
    assert choice.finish_reason == "tool_calls"
    check_calls(choice.message, {"get_weather", "get_time"})


def test_named_choice_calls_that_function_once(openai_client: openai.OpenAI) -> None:
    response = openai_client.chat.completions.create(
        messages=ASK,
        tools=TOOLS,
        tool_choice={"type": "function", "function": {"name": "get_time"}},
        **SETTINGS,
    )
    choice = response.choices[0]
    assert choice.finish_reason == "tool_calls"
    check_calls(choice.message, {"get_time"})
    assert len(choice.message.tool_calls or []) == 1


def test_no_parallel_calls_means_one_call(openai_client: openai.OpenAI) -> None:
    response = openai_client.chat.completions.create(
        messages=ASK, tools=TOOLS, tool_choice="required", parallel_tool_calls=False, **SETTINGS
    )
    assert len(response.choices[0].message.tool_calls or []) == 1


def test_none_answers_in_text(openai_client: openai.OpenAI) -> None:
    response = openai_client.chat.completions.create(
        messages=ASK, tools=TOOLS, tool_choice="none", **SETTINGS
    )
    message = response.choices[0].message
    assert message.content and not message.tool_calls
    assert response.choices[0].finish_reason in ("stop", "length")


def test_auto_answers_with_text_or_a_valid_call(openai_client: openai.OpenAI) -> None:
    response = openai_client.chat.completions.create(
        messages=ASK, tools=TOOLS, tool_choice="auto", **SETTINGS
    )
    choice = response.choices[0]
    if choice.message.tool_calls:
        assert choice.finish_reason == "tool_calls"
        check_calls(choice.message, {"get_weather", "get_time"})
    else:
        assert choice.message.content


def test_streamed_call_is_assembled_by_the_client(openai_client: openai.OpenAI) -> None:
    plain = openai_client.chat.completions.create(
        messages=ASK, tools=TOOLS, tool_choice="required", **SETTINGS
    )
    with openai_client.chat.completions.stream(
        messages=ASK, tools=TOOLS, tool_choice="required", **SETTINGS
    ) as stream:
        final = stream.get_final_completion()
    choice = final.choices[0]
    assert choice.finish_reason == "tool_calls"
    check_calls(choice.message, {"get_weather", "get_time"})
    expected = [(c.function.name, c.function.arguments) for c in plain.choices[0].message.tool_calls or []]
    assert [(c.function.name, c.function.arguments) for c in choice.message.tool_calls or []] == expected


def test_streamed_fragments_have_openai_shape(openai_client: openai.OpenAI) -> None:
    chunks = list(
        openai_client.chat.completions.create(
            messages=ASK,
            tools=TOOLS,
            tool_choice={"type": "function", "function": {"name": "get_weather"}},
            stream=True,
            **SETTINGS,
        )
    )
    fragments = [fragment for chunk in chunks for fragment in chunk.choices[0].delta.tool_calls or []]
    head = fragments[0]
    assert head.index == 0 and head.id and head.type == "function"
    assert head.function is not None and head.function.name == "get_weather"
    assert all(fragment.id is None and fragment.index == 0 for fragment in fragments[1:])
    arguments = "".join(f.function.arguments or "" for f in fragments if f.function is not None)
    jsonschema.validate(json.loads(arguments), WEATHER_PARAMETERS)
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_a_tool_result_in_history_is_answered(openai_client: openai.OpenAI) -> None:
    first = openai_client.chat.completions.create(
        messages=ASK,
        tools=TOOLS,
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        **SETTINGS,
    )
    call = (first.choices[0].message.tool_calls or [])[0]
    messages: Any = [
        *ASK,
        first.choices[0].message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 18, "sky": "sunny"}'},
    ]
    answer = openai_client.chat.completions.create(messages=messages, tools=TOOLS, **SETTINGS)
    choice = answer.choices[0]
    assert choice.message.content or choice.message.tool_calls
    if choice.message.tool_calls:
        check_calls(choice.message, {"get_weather", "get_time"})


class Lookup(pydantic.BaseModel):
    city: str = pydantic.Field(max_length=40)


def test_client_parses_strict_pydantic_tools(openai_client: openai.OpenAI) -> None:
    completion = openai_client.chat.completions.parse(
        messages=ASK, tools=[openai.pydantic_function_tool(Lookup)], tool_choice="required", **SETTINGS
    )
    calls = completion.choices[0].message.tool_calls or []
    assert calls and all(isinstance(call.function.parsed_arguments, Lookup) for call in calls)


def test_legacy_functions_are_refused(openai_client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError, match="functions"):
        openai_client.chat.completions.create(
            messages=ASK, functions=[{"name": "get_weather", "parameters": WEATHER_PARAMETERS}], **SETTINGS
        )
