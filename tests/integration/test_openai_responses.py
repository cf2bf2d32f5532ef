"""POST /v1/responses through the official `openai` client against a real agent on real SmolLM2:
text and message-list input, instructions, streaming events, function tools and text.format."""

from __future__ import annotations

import json
from typing import Any

import jsonschema
import openai
import pydantic
import pytest

from tests.integration.openai_agent import MODEL_ID, openai_client, smollm2_runtime

pytestmark = pytest.mark.integration
__all__ = ["openai_client", "smollm2_runtime"]

SETTINGS: dict[str, Any] = {"model": MODEL_ID, "max_output_tokens": 60, "temperature": 0, "store": False}
WEATHER: Any = {
    "type": "function",
    "name": "get_weather",
    "description": "Current weather in a city",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string", "maxLength": 40}},
        "required": ["city"],
        "additionalProperties": False,
    },
    "strict": True,
}
PERSON = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 40}, "age": {"type": "integer", "minimum": 0}},
    "required": ["name", "age"],
    "additionalProperties": False,
}


def test_text_input(openai_client: openai.OpenAI) -> None:
    response = openai_client.responses.create(input="What is the capital of France?", **SETTINGS)
    assert response.object == "response" and response.status in ("completed", "incomplete")
    assert response.output_text.strip()
    assert response.usage is not None and response.usage.output_tokens > 0
    assert response.usage.total_tokens == response.usage.input_tokens + response.usage.output_tokens


def test_message_list_input_with_instructions(openai_client: openai.OpenAI) -> None:
    response = openai_client.responses.create(
        instructions="Answer in one short sentence.",
        input=[
            {"role": "user", "content": "Hi!"},
            {"role": "assistant", "content": "Hello! How can I help?"},
            {"role": "user", "content": [{"type": "input_text", "text": "Name a color."}]},
        ],
        **SETTINGS,
    )
    assert response.output_text.strip()
    assert response.instructions == "Answer in one short sentence."


def test_streamed_events_assemble_the_same_text(openai_client: openai.OpenAI) -> None:
    plain = openai_client.responses.create(input="What is the capital of France?", **SETTINGS)
    events = list(
        openai_client.responses.create(input="What is the capital of France?", stream=True, **SETTINGS)
    )
    kinds = [event.type for event in events]
    assert kinds[:2] == ["response.created", "response.in_progress"]
    assert kinds[-1] in ("response.completed", "response.incomplete")
    assert [event.sequence_number for event in events] == list(range(len(events)))
    deltas = "".join(event.delta for event in events if event.type == "response.output_text.delta")
    assert deltas == plain.output_text
    final = events[-1].response  # type: ignore[union-attr]
    assert final.output_text == plain.output_text and final.usage is not None


def test_stream_helper_final_response(openai_client: openai.OpenAI) -> None:
    with openai_client.responses.stream(input="Say hello.", **SETTINGS) as stream:
        final = stream.get_final_response()
    assert final.output_text.strip()


def test_required_function_call_and_its_output(openai_client: openai.OpenAI) -> None:
    ask = [{"role": "user", "content": "What is the weather in Paris?"}]
    response = openai_client.responses.create(input=ask, tools=[WEATHER], tool_choice="required", **SETTINGS)
    calls = [item for item in response.output if item.type == "function_call"]
    assert calls and calls[0].name == "get_weather" and calls[0].call_id
    jsonschema.validate(json.loads(calls[0].arguments), WEATHER["parameters"])
    follow_up = openai_client.responses.create(
        input=[
            *ask,
            {
                "type": "function_call",
                "call_id": calls[0].call_id,
                "name": "get_weather",
                "arguments": calls[0].arguments,
            },
            {
                "type": "function_call_output",
                "call_id": calls[0].call_id,
                "output": '{"sky": "sunny", "celsius": 18}',
            },
        ],
        tools=[WEATHER],
        tool_choice="none",
        **SETTINGS,
    )
    assert follow_up.output_text.strip()


def test_streamed_function_call(openai_client: openai.OpenAI) -> None:
    events = list(
        openai_client.responses.create(
            input="Weather in Paris?",
            tools=[WEATHER],
            tool_choice={"type": "function", "name": "get_weather"},
            stream=True,
            **SETTINGS,
        )
    )
    arguments = "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta")
    jsonschema.validate(json.loads(arguments), WEATHER["parameters"])
    done = [e for e in events if e.type == "response.function_call_arguments.done"]
    assert done and done[0].arguments == arguments
    assert events[-1].type == "response.completed"


def test_json_schema_text_format(openai_client: openai.OpenAI) -> None:
    fmt: Any = {"type": "json_schema", "name": "person", "schema": PERSON, "strict": True}
    response = openai_client.responses.create(
        input="Describe a person as JSON.", text={"format": fmt}, **{**SETTINGS, "max_output_tokens": 120}
    )
    jsonschema.validate(json.loads(response.output_text), PERSON)
    streamed = list(
        openai_client.responses.create(
            input="Describe a person as JSON.",
            text={"format": fmt},
            stream=True,
            **{**SETTINGS, "max_output_tokens": 120},
        )
    )
    text = "".join(e.delta for e in streamed if e.type == "response.output_text.delta")
    jsonschema.validate(json.loads(text), PERSON)


class Person(pydantic.BaseModel):
    name: str = pydantic.Field(max_length=40)
    age: int = pydantic.Field(ge=0, le=150)


def test_client_parse(openai_client: openai.OpenAI) -> None:
    parsed = openai_client.responses.parse(
        input="Describe a person.", text_format=Person, **{**SETTINGS, "max_output_tokens": 120}
    )
    assert isinstance(parsed.output_parsed, Person)


@pytest.mark.parametrize(
    ("extra", "param"),
    [({"store": True}, "store"), ({"previous_response_id": "resp_123"}, "previous_response_id")],
)
def test_state_is_refused(openai_client: openai.OpenAI, extra: dict[str, Any], param: str) -> None:
    with pytest.raises(openai.BadRequestError, match=param):
        openai_client.responses.create(input="Hi", **{**SETTINGS, **extra})
