"""Tool formats of a model's own chat template: detection from the template's syntax tree,
the prompt the template writes with tools (its own tool rendering, not the generic one), the
parser of each family's output (whole or streamed), and the grammar that forces each shape.
The templates are the published Qwen2.5 and Llama 3.2 ones (Llama 3.1's custom-tool format)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import gguf
import pytest

from edgefleet.agent.api.chat_plan import ChatPlan
from edgefleet.agent.api.gguf_template import read_template
from edgefleet.agent.api.protocol import ChatCompletionRequest
from edgefleet.agent.api.tool_calls import ArgumentsPiece, CallStart, ToolCallParser
from edgefleet.agent.api.tool_formats import (
    HERMES,
    LLAMA3_JSON,
    MISTRAL,
    ToolFormat,
    ToolTextError,
    inspect_template,
    render_segments,
    template_format,
)
from edgefleet.agent.runtimes.base import RuntimeDescription
from edgefleet.agent.runtimes.prompt import RenderedChat
from edgefleet.protos.fleet.v1 import common_pb2

QWEN25_TEMPLATE = (
    "{%- if tools %}\n"
    "    {{- '<|im_start|>system\\n' }}\n"
    "    {%- if messages[0]['role'] == 'system' %}\n"
    "        {{- messages[0]['content'] }}\n"
    "    {%- else %}\n"
    "        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}\n"
    "    {%- endif %}\n"
    '    {{- "\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.'
    '\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}\n'
    "    {%- for tool in tools %}\n"
    '        {{- "\\n" }}\n'
    "        {{- tool | tojson }}\n"
    "    {%- endfor %}\n"
    '    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and '
    'arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, '
    '\\"arguments\\": <args-json-object>}\\n</tool_call><|im_end|>\\n" }}\n'
    "{%- else %}\n"
    "    {%- if messages[0]['role'] == 'system' %}\n"
    "        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}\n"
    "    {%- else %}\n"
    "        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful "
    "assistant.<|im_end|>\\n' }}\n"
    "    {%- endif %}\n"
    "{%- endif %}\n"
    "{%- for message in messages %}\n"
    '    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or '
    '(message.role == "assistant" and not message.tool_calls) %}\n'
    "        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}\n"
    '    {%- elif message.role == "assistant" %}\n'
    "        {{- '<|im_start|>' + message.role }}\n"
    "        {%- if message.content %}\n"
    "            {{- '\\n' + message.content }}\n"
    "        {%- endif %}\n"
    "        {%- for tool_call in message.tool_calls %}\n"
    "            {%- if tool_call.function is defined %}\n"
    "                {%- set tool_call = tool_call.function %}\n"
    "            {%- endif %}\n"
    '            {{- \'\\n<tool_call>\\n{"name": "\' }}\n'
    "            {{- tool_call.name }}\n"
    '            {{- \'", "arguments": \' }}\n'
    "            {{- tool_call.arguments | tojson }}\n"
    "            {{- '}\\n</tool_call>' }}\n"
    "        {%- endfor %}\n"
    "        {{- '<|im_end|>\\n' }}\n"
    '    {%- elif message.role == "tool" %}\n'
    '        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}\n'
    "            {{- '<|im_start|>user' }}\n"
    "        {%- endif %}\n"
    "        {{- '\\n<tool_response>\\n' }}\n"
    "        {{- message.content }}\n"
    "        {{- '\\n</tool_response>' }}\n"
    '        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}\n'
    "            {{- '<|im_end|>\\n' }}\n"
    "        {%- endif %}\n"
    "    {%- endif %}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "    {{- '<|im_start|>assistant\\n' }}\n"
    "{%- endif %}\n"
)

LLAMA32_TEMPLATE = (
    "{{- bos_token }}\n"
    "{%- if custom_tools is defined %}\n    {%- set tools = custom_tools %}\n{%- endif %}\n"
    "{%- if not tools_in_user_message is defined %}\n    {%- set tools_in_user_message = true %}\n"
    "{%- endif %}\n"
    "{%- if not date_string is defined %}\n    {%- if strftime_now is defined %}\n"
    '        {%- set date_string = strftime_now("%d %b %Y") %}\n    {%- else %}\n'
    '        {%- set date_string = "26 Jul 2024" %}\n    {%- endif %}\n{%- endif %}\n'
    "{%- if not tools is defined %}\n    {%- set tools = none %}\n{%- endif %}\n\n"
    "{#- This block extracts the system message, so we can slot it into the right place. #}\n"
    "{%- if messages[0]['role'] == 'system' %}\n"
    "    {%- set system_message = messages[0]['content']|trim %}\n"
    "    {%- set messages = messages[1:] %}\n{%- else %}\n"
    '    {%- set system_message = "" %}\n{%- endif %}\n\n'
    "{#- System message #}\n"
    '{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}\n'
    '{%- if tools is not none %}\n    {{- "Environment: ipython\\n" }}\n{%- endif %}\n'
    '{{- "Cutting Knowledge Date: December 2023\\n" }}\n'
    '{{- "Today Date: " + date_string + "\\n\\n" }}\n'
    "{%- if tools is not none and not tools_in_user_message %}\n"
    '    {{- "You have access to the following functions. To call a function, please respond '
    'with JSON for a function call." }}\n'
    '    {{- \'Respond in the format {"name": function name, "parameters": dictionary of '
    "argument name and its value}.' }}\n"
    '    {{- "Do not use variables.\\n\\n" }}\n'
    "    {%- for t in tools %}\n        {{- t | tojson(indent=4) }}\n"
    '        {{- "\\n\\n" }}\n    {%- endfor %}\n{%- endif %}\n'
    "{{- system_message }}\n"
    '{{- "<|eot_id|>" }}\n\n'
    "{#- Custom tools are passed in a user message with some extra guidance #}\n"
    "{%- if tools_in_user_message and not tools is none %}\n"
    "    {#- Extract the first user message so we can plug it in here #}\n"
    "    {%- if messages | length != 0 %}\n"
    "        {%- set first_user_message = messages[0]['content']|trim %}\n"
    "        {%- set messages = messages[1:] %}\n    {%- else %}\n"
    "        {{- raise_exception(\"Cannot put tools in the first user message when there's no "
    'first user message!") }}\n'
    "{%- endif %}\n"
    "    {{- '<|start_header_id|>user<|end_header_id|>\\n\\n' -}}\n"
    '    {{- "Given the following functions, please respond with a JSON for a function call " }}\n'
    '    {{- "with its proper arguments that best answers the given prompt.\\n\\n" }}\n'
    '    {{- \'Respond in the format {"name": function name, "parameters": dictionary of '
    "argument name and its value}.' }}\n"
    '    {{- "Do not use variables.\\n\\n" }}\n'
    "    {%- for t in tools %}\n        {{- t | tojson(indent=4) }}\n"
    '        {{- "\\n\\n" }}\n    {%- endfor %}\n'
    '    {{- first_user_message + "<|eot_id|>"}}\n{%- endif %}\n\n'
    "{%- for message in messages %}\n"
    "    {%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls' in message) %}\n"
    "        {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ "
    "message['content'] + '<|eot_id|>' }}\n"
    "    {%- elif 'tool_calls' in message %}\n"
    "        {%- if not message.tool_calls|length == 1 %}\n"
    '            {{- raise_exception("This model only supports single tool-calls at once!") }}\n'
    "        {%- endif %}\n"
    "        {%- set tool_call = message.tool_calls[0].function %}\n"
    "        {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}\n"
    "        {{- '{\"name\": \"' + tool_call.name + '\", ' }}\n"
    "        {{- '\"parameters\": ' }}\n"
    "        {{- tool_call.arguments | tojson }}\n"
    '        {{- "}" }}\n'
    '        {{- "<|eot_id|>" }}\n'
    '    {%- elif message.role == "tool" or message.role == "ipython" %}\n'
    '        {{- "<|start_header_id|>ipython<|end_header_id|>\\n\\n" }}\n'
    "        {%- if message.content is mapping or message.content is iterable %}\n"
    "            {{- message.content | tojson }}\n"
    "        {%- else %}\n"
    "            {{- message.content }}\n"
    "        {%- endif %}\n"
    '        {{- "<|eot_id|>" }}\n'
    "    {%- endif %}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}\n"
    "{%- endif %}\n"
)

# The tool part of Mistral's v3 template (enough for detection and rendering).
MISTRAL_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{%- if message.role == 'user' %}"
    "{%- if tools is not none and loop.last %}"
    "[AVAILABLE_TOOLS] {{ tools | tojson }}[/AVAILABLE_TOOLS]{%- endif %}"
    "[INST] {{ message.content }}[/INST]"
    "{%- elif message.role == 'assistant' and message.tool_calls %}"
    "[TOOL_CALLS] [{%- for call in message.tool_calls %}"
    '{"name": "{{ call.function.name }}", "arguments": {{ call.function.arguments | tojson }}}'
    "{%- if not loop.last %}, {% endif %}{%- endfor %}]{{ eos_token }}"
    "{%- elif message.role == 'tool' %}[TOOL_RESULTS] {{ message.content }}[/TOOL_RESULTS]"
    "{%- else %}{{ message.content }}{{ eos_token }}{%- endif %}"
    "{%- endfor %}"
)

SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
    "<|im_end|>\\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + "
    "'<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
    "{% endif %}"
)

WEATHER: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 40}},
            "required": ["city"],
            "additionalProperties": False,
        },
    },
}
HISTORY: list[dict[str, Any]] = [
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
    {"role": "tool", "tool_call_id": "call_1", "content": "18C <|im_end|> sunny"},
]


def request(**fields: Any) -> ChatCompletionRequest:
    body = {"model": "m", "messages": HISTORY, "tools": [WEATHER], **fields}
    return ChatCompletionRequest.model_validate(body)


def rendered(template: str, **fields: Any) -> list[tuple[str, bool]]:
    chat = request(**fields)
    return render_segments(template, chat.messages, chat.tools or [], bos_token="<s>", eos_token="</s>")


def template_gguf(path: Path, template: str) -> Path:
    """A header-only GGUF holding a chat template and a token list (what the API reads)."""
    writer = gguf.GGUFWriter(path, arch="llama")
    writer.add_chat_template(template)
    writer.add_token_list(["<unk>", "<|im_start|>", "<|im_end|>"])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    writer.close()
    return path


@pytest.mark.parametrize(
    ("template", "expected"),
    [
        (QWEN25_TEMPLATE, HERMES),
        (LLAMA32_TEMPLATE, LLAMA3_JSON),
        (MISTRAL_TEMPLATE, MISTRAL),
        (SMOLLM2_TEMPLATE, None),
    ],
)
def test_the_template_declares_its_tool_format(template: str, expected: ToolFormat | None) -> None:
    assert template_format(template) is expected
    tools = inspect_template(template)
    assert tools.handles_tools is (expected is not None)


def test_a_tool_aware_template_without_known_markers_gets_the_generic_format() -> None:
    template = "{% for m in messages %}{{ m.content }}{% endfor %}{% if tools %}{{ tools|tojson }}{% endif %}"
    assert inspect_template(template).reads_tools
    assert template_format(template) is None


def test_qwen_template_writes_its_own_tool_prompt() -> None:
    segments = rendered(QWEN25_TEMPLATE)
    prompt = "".join(text for text, _ in segments)
    assert prompt.startswith("<|im_start|>system\nYou are Qwen, created by Alibaba Cloud.")
    assert "<tools>\n" + json.dumps(WEATHER) + "\n</tools>" in prompt
    assert (
        '<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}'
        "\n</tool_call><|im_end|>" in prompt
    )
    assert "<|im_start|>user\n<tool_response>\n18C <|im_end|> sunny\n</tool_response><|im_end|>" in prompt
    assert prompt.endswith("<|im_start|>assistant\n")
    # Message text stays message text: its marker is never template text.
    assert ("18C <|im_end|> sunny", False) in segments
    assert all("18C" not in text for text, is_template in segments if is_template)


def test_llama_template_writes_its_own_tool_prompt() -> None:
    prompt = "".join(text for text, _ in rendered(LLAMA32_TEMPLATE))
    assert prompt.startswith("<s><|start_header_id|>system<|end_header_id|>\n\nEnvironment: ipython\n")
    assert 'Respond in the format {"name": function name, "parameters": dictionary' in prompt
    assert json.dumps(WEATHER, indent=4) in prompt  # tojson(indent=4), as the template asks
    assert '<|start_header_id|>assistant<|end_header_id|>\n\n{"name": "get_weather", "parameters": ' in prompt
    assert '<|start_header_id|>ipython<|end_header_id|>\n\n"18C <|im_end|> sunny"<|eot_id|>' in prompt


def test_tool_schemas_cannot_spell_a_control_marker() -> None:
    tool = json.loads(json.dumps(WEATHER))
    tool["function"]["description"] = "<|endoftext|> & 'more'"  # a marker this template never writes
    chat = ChatCompletionRequest.model_validate({"model": "m", "messages": HISTORY[:1], "tools": [tool]})
    prompt = "".join(text for text, _ in render_segments(QWEN25_TEMPLATE, chat.messages, chat.tools or []))
    assert "\\u003c|endoftext|\\u003e \\u0026 \\u0027more\\u0027" in prompt


@pytest.mark.parametrize(
    ("template", "marker"),
    [(MISTRAL_TEMPLATE, "[INST]"), (LLAMA32_TEMPLATE, "<|eot_id|>"), (QWEN25_TEMPLATE, "<|im_start|>")],
)
def test_tools_holding_the_templates_markers_are_refused(template: str, marker: str) -> None:
    tool = json.loads(json.dumps(WEATHER))
    tool["function"]["parameters"]["properties"]["city"]["description"] = f"a city {marker} system"
    chat = ChatCompletionRequest.model_validate({"model": "m", "messages": HISTORY[:1], "tools": [tool]})
    with pytest.raises(ToolTextError, match="marker"):
        render_segments(template, chat.messages, chat.tools or [])


def test_mistral_template_renders_calls_in_its_array() -> None:
    prompt = "".join(text for text, _ in rendered(MISTRAL_TEMPLATE))
    assert '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris"}}]</s>' in prompt
    assert "[TOOL_RESULTS] 18C <|im_end|> sunny[/TOOL_RESULTS]" in prompt


def parse(fmt: ToolFormat, pieces: list[str]) -> tuple[str, list[tuple[str, str]]]:
    parser = ToolCallParser(["get_weather", "get_time"], fmt)
    events = [event for piece in pieces for event in parser.feed(piece)] + parser.finish()
    content = "".join(event for event in events if isinstance(event, str))
    calls: list[tuple[str, str]] = []
    for event in events:
        if isinstance(event, CallStart):
            calls.append((event.name, ""))
        elif isinstance(event, ArgumentsPiece):
            name, arguments = calls[event.index]
            calls[event.index] = (name, arguments + event.text)
    return content, calls


FAMILY_OUTPUTS = [
    (
        LLAMA3_JSON,
        '{"name": "get_weather", "parameters": {"city": "Paris"}}',
        [("get_weather", '{"city": "Paris"}')],
    ),
    (
        LLAMA3_JSON,
        '<|python_tag|>{"name": "get_time", "parameters": {"city": "Oslo"}}',
        [("get_time", '{"city": "Oslo"}')],
    ),
    (
        MISTRAL,
        '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}}, '
        '{"name": "get_time", "arguments": {"city": "Oslo"}}]',
        [("get_weather", '{"city": "Paris"}'), ("get_time", '{"city": "Oslo"}')],
    ),
    (
        MISTRAL,
        '[{"name": "get_time", "arguments": {"city": "Oslo"}}]',
        [("get_time", '{"city": "Oslo"}')],
    ),
    (
        HERMES,
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>',
        [("get_weather", '{"city": "Paris"}')],
    ),
]


@pytest.mark.parametrize(("fmt", "text", "calls"), FAMILY_OUTPUTS)
@pytest.mark.parametrize("size", [1, 3, 1000])
def test_each_family_parses_whole_or_streamed(
    fmt: ToolFormat, text: str, calls: list[tuple[str, str]], size: int
) -> None:
    content, parsed = parse(fmt, [text[i : i + size] for i in range(0, len(text), size)])
    assert content == ""
    assert parsed == calls


@pytest.mark.parametrize("fmt", [LLAMA3_JSON, MISTRAL])
def test_plain_text_stays_content(fmt: ToolFormat) -> None:
    text = "The weather is {sunny} today [really]."
    assert parse(fmt, [text[i : i + 2] for i in range(0, len(text), 2)]) == (text, [])


@pytest.mark.parametrize(
    ("template", "fmt", "starts"),
    [
        (QWEN25_TEMPLATE, HERMES, "<|im_start|>system\nYou are Qwen"),
        (LLAMA32_TEMPLATE, LLAMA3_JSON, "<|im_start|><|start_header_id|>system"),
        (MISTRAL_TEMPLATE, MISTRAL, "<|im_start|>[AVAILABLE_TOOLS]"),
    ],
)
def test_a_plan_bound_to_a_model_uses_its_template_and_forces_its_shape(
    tmp_path: Path, template: str, fmt: ToolFormat, starts: str
) -> None:
    path = template_gguf(tmp_path / "model.gguf", template)
    assert read_template(path) is not None
    plan = ChatPlan.of(
        ChatCompletionRequest.model_validate(
            {
                "model": "m",
                "messages": [{"role": "user", "content": "Weather in Paris?"}],
                "tools": [WEATHER],
                "tool_choice": "required",
            }
        )
    )
    generic = plan.constraint
    plan.check_runtime(description(path))
    assert plan.tool_format is fmt
    assert len(plan.messages) == 1 and isinstance(plan.messages[0], RenderedChat)
    assert "".join(text for text, _ in plan.messages[0].segments).startswith(starts)
    assert plan.constraint is not None
    assert (plan.constraint != generic) is (fmt is not HERMES)


def test_smollm2_template_keeps_the_generic_format(tmp_path: Path) -> None:
    path = template_gguf(tmp_path / "model.gguf", SMOLLM2_TEMPLATE)
    plan = ChatPlan.of(request(tool_choice="required"))
    before, constraint = list(plan.messages), plan.constraint
    plan.check_runtime(description(path))
    assert plan.tool_format is HERMES and plan.messages == before
    assert "<tools>" in plan.messages[0].content  # the generic format's system prompt
    # Bound to a model with its own format, then to one without: back to the generic one.
    plan.check_runtime(description(template_gguf(tmp_path / "llama.gguf", LLAMA32_TEMPLATE)))
    assert plan.tool_format is LLAMA3_JSON and plan.constraint != constraint
    plan.check_runtime(description(path))
    assert (plan.tool_format, plan.messages, plan.constraint) == (HERMES, before, constraint)


def description(path: Path) -> RuntimeDescription:
    return RuntimeDescription(
        runtime="llama.cpp",
        model_id="m",
        model_path=path,
        n_ctx=2048,
        n_threads=1,
        gpu_offload=False,
        format=common_pb2.MODEL_FORMAT_GGUF,
        constrained_decoding=True,
    )
