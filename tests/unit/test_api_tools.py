"""Tools on chat completions and the Responses API against a fake runtime: the tool-call format
and its parser, the history rendering, and every refusal (named field, 400)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from edgefleet.agent.api import create_app
from edgefleet.agent.api.chat_plan import ChatPlan
from edgefleet.agent.api.errors import APIError
from edgefleet.agent.api.protocol import ChatCompletionRequest
from edgefleet.agent.api.tool_calls import ArgumentsPiece, CallStart, ToolCallParser
from edgefleet.agent.runtimes.model_table import ModelTable
from tests.unit.test_api import MODEL, FakeRuntime, Recorder, assert_openai_error, stream

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
TIME = {
    "type": "function",
    "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}},
}
CALL_TEXT = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'


def chat(**fields: Any) -> ChatCompletionRequest:
    body: dict[str, Any] = {"model": MODEL, "messages": [{"role": "user", "content": "Weather in Paris?"}]}
    body.update(fields)
    return ChatCompletionRequest.model_validate_json(json.dumps(body))


# --- parser ------------------------------------------------------------------------------


def test_parser_reads_calls_whole() -> None:
    parser = ToolCallParser(["get_weather", "get_time"])
    parser.feed(
        "Let me check.\n" + CALL_TEXT + '\n<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>'
    )
    parser.finish()
    assert [(call.name, "".join(call.arguments)) for call in parser.calls] == [
        ("get_weather", '{"city": "Paris"}'),
        ("get_time", "{}"),
    ]
    assert "".join(parser.content) == "Let me check.\n"


@pytest.mark.parametrize("size", [1, 2, 3, 7])
def test_parser_streams_the_same_calls_in_any_pieces(size: int) -> None:
    text = CALL_TEXT.replace('"Paris"', '"Pa}ris {x}"')
    parser = ToolCallParser(["get_weather"])
    events = []
    for start in range(0, len(text), size):
        events += parser.feed(text[start : start + size])
    events += parser.finish()
    starts = [event for event in events if isinstance(event, CallStart)]
    assert [(start.index, start.name) for start in starts] == [(0, "get_weather")]
    arguments = "".join(event.text for event in events if isinstance(event, ArgumentsPiece))
    assert json.loads(arguments) == {"city": "Pa}ris {x}"}
    assert not [event for event in events if isinstance(event, str)]


def test_parser_leaves_plain_text_and_unknown_functions_as_content() -> None:
    for text in (
        "Paris is sunny. <tool and more",
        '<tool_call>\n{"name": "rm_rf", "arguments": {}}\n</tool_call>',
    ):
        parser = ToolCallParser(["get_weather"])
        pieces = [event for event in parser.feed(text) + parser.finish() if isinstance(event, str)]
        assert "".join(pieces) == text
        assert not parser.calls


# --- plans and refusals ------------------------------------------------------------------


def test_history_with_calls_and_results_is_rendered_in_the_tool_format() -> None:
    plan = ChatPlan.of(
        chat(
            tools=[WEATHER],
            messages=[
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Weather in Paris?"},
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [
                        {
                            "id": "call_1",
                            "type": "function",
                            "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                        }
                    ],
                },
                {"role": "tool", "tool_call_id": "call_1", "content": "18C, sunny"},
            ],
        )
    )
    roles = [message.role for message in plan.messages]
    assert roles == ["system", "user", "assistant", "user"]
    assert plan.messages[0].content.startswith("Be brief.\n\n# Tools")
    assert '"name": "get_weather"' in plan.messages[0].content
    assert plan.messages[2].content == CALL_TEXT
    assert plan.messages[3].content == "<tool_response>\n18C, sunny\n</tool_response>"
    assert plan.constraint is None and plan.tool_names == ("get_weather",)


def test_required_and_named_choices_compile_a_grammar() -> None:
    required = ChatPlan.of(chat(tools=[WEATHER, TIME], tool_choice="required"))
    assert required.constraint is not None and required.constraint_param == "tool_choice"
    named = ChatPlan.of(
        chat(tools=[WEATHER, TIME], tool_choice={"type": "function", "function": {"name": "get_time"}})
    )
    assert named.constraint is not None and named.tool_names == ("get_time",)
    none = ChatPlan.of(chat(tools=[WEATHER], tool_choice="none"))
    assert none.constraint is None and none.tool_names == ()
    assert "# Tools" not in none.messages[0].content


def test_auto_choice_with_a_response_format_allows_calls_or_that_json() -> None:
    plan = ChatPlan.of(chat(tools=[WEATHER], response_format={"type": "json_object"}))
    assert plan.constraint is not None and plan.constraint_param == "response_format"
    assert plan.tool_names == ("get_weather",)


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"tool_choice": "required"}, "tool_choice"),
        (
            {"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
            "tool_choice",
        ),
        ({"tools": [WEATHER, WEATHER]}, "tools"),
        (
            {
                "tools": [
                    {"type": "function", "function": {"name": "f", "parameters": {"type": "nonsense"}}}
                ],
                "tool_choice": "required",
            },
            "tools",
        ),
    ],
)
def test_tool_refusals_name_the_field(fields: dict[str, Any], param: str) -> None:
    with pytest.raises(APIError) as refused:
        ChatPlan.of(chat(**fields))
    assert refused.value.status == 400 and refused.value.info.param == param


# --- through the API, on a runtime that cannot constrain ---------------------------------


@pytest.fixture
def caller() -> FakeRuntime:
    return FakeRuntime(reply="Let me look. " + CALL_TEXT, n_ctx=4096)


@pytest.fixture
def client(caller: FakeRuntime) -> Iterator[TestClient]:
    app: FastAPI = create_app(models=ModelTable(caller), observer=Recorder())
    with TestClient(app, raise_server_exceptions=False) as test_client:
        yield test_client


def body(**fields: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"model": MODEL, "messages": [{"role": "user", "content": "Weather in Paris?"}]}
    out.update(fields)
    return out


def test_auto_choice_parses_the_call(client: TestClient) -> None:
    response = client.post("/v1/chat/completions", json=body(tools=[WEATHER]))
    assert response.status_code == 200, response.text
    choice = response.json()["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    (call,) = choice["message"]["tool_calls"]
    assert call["type"] == "function" and call["id"].startswith("call_")
    assert call["function"]["name"] == "get_weather"
    assert json.loads(call["function"]["arguments"]) == {"city": "Paris"}
    assert choice["message"]["content"] == "Let me look."


def test_auto_choice_streams_call_fragments(client: TestClient) -> None:
    response, events = stream(client, "/v1/chat/completions", body(tools=[WEATHER], stream=True))
    assert response.status_code == 200
    chunks = [json.loads(event) for event in events if event != "[DONE]"]
    fragments = [tc for chunk in chunks for tc in chunk["choices"][0]["delta"].get("tool_calls", [])]
    assert fragments[0]["id"].startswith("call_") and fragments[0]["function"]["name"] == "get_weather"
    assert fragments[0]["type"] == "function" and fragments[0]["index"] == 0
    arguments = "".join(fragment["function"].get("arguments", "") for fragment in fragments)
    assert json.loads(arguments) == {"city": "Paris"}
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"response_format": {"type": "json_object"}}, "response_format"),
        ({"tools": [WEATHER], "tool_choice": "required"}, "tool_choice"),
    ],
)
def test_a_runtime_that_cannot_constrain_refuses(
    client: TestClient, fields: dict[str, Any], param: str
) -> None:
    error = assert_openai_error(client.post("/v1/chat/completions", json=body(**fields)), 400)
    assert error["param"] == param and "constrain" in error["message"]


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"functions": [{"name": "f"}]}, "functions"),
        ({"function_call": "auto"}, "function_call"),
        ({"messages": [{"role": "tool", "content": "x"}]}, "messages"),
        ({"messages": [{"role": "user", "content": "x", "tool_calls": []}]}, "messages"),
    ],
)
def test_malformed_tool_fields_are_refused(client: TestClient, fields: dict[str, Any], field: str) -> None:
    error = assert_openai_error(client.post("/v1/chat/completions", json=body(**fields)), 400)
    assert error["param"] is not None and error["param"].startswith(field)


def test_responses_function_call_and_refusals(client: TestClient) -> None:
    request = {
        "model": MODEL,
        "input": "Weather in Paris?",
        "tools": [{"type": "function", **WEATHER["function"]}],
    }
    response = client.post("/v1/responses", json=request)
    assert response.status_code == 200, response.text
    output = response.json()["output"]
    assert [item["type"] for item in output] == ["message", "function_call"]
    assert json.loads(output[1]["arguments"]) == {"city": "Paris"}
    for refused, param in (
        ({"store": True}, "store"),
        ({"previous_response_id": "resp_1"}, "previous_response_id"),
        ({"text": {"format": {"type": "json_object"}}}, "text.format"),
    ):
        error = assert_openai_error(client.post("/v1/responses", json={**request, **refused}), 400)
        assert error["param"] == param, error


def test_responses_stream_events_in_order(client: TestClient) -> None:
    request = {
        "model": MODEL,
        "input": "Weather in Paris?",
        "stream": True,
        "tools": [{"type": "function", **WEATHER["function"]}],
    }
    response, payloads = stream(client, "/v1/responses", request)
    assert response.status_code == 200
    assert payloads[-1] == "[DONE]"
    events = [json.loads(payload) for payload in payloads[:-1]]
    assert [event["sequence_number"] for event in events] == list(range(len(events)))
    kinds = [event["type"] for event in events]
    deduped = [kind for index, kind in enumerate(kinds) if index == 0 or kinds[index - 1] != kind]
    assert deduped == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        "response.output_text.delta",
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.output_item.added",
        "response.function_call_arguments.delta",
        "response.function_call_arguments.done",
        "response.output_item.done",
        "response.completed",
    ]
    final = events[-1]["response"]
    assert final["status"] == "completed" and final["usage"]["output_tokens"] > 0
    message, call = final["output"]
    assert message["content"][0]["text"] == "".join(
        event["delta"] for event in events if event["type"] == "response.output_text.delta"
    )
    arguments = "".join(e["delta"] for e in events if e["type"] == "response.function_call_arguments.delta")
    assert call["arguments"] == arguments and json.loads(arguments) == {"city": "Paris"}


def test_responses_cut_by_the_token_limit_are_incomplete(client: TestClient) -> None:
    request = {"model": MODEL, "input": "Hi", "max_output_tokens": 1}
    body = client.post("/v1/responses", json=request).json()
    assert body["status"] == "incomplete"
    assert body["incomplete_details"] == {"reason": "max_output_tokens"}
    _, payloads = stream(client, "/v1/responses", {**request, "stream": True})
    assert json.loads(payloads[-2])["type"] == "response.incomplete"
