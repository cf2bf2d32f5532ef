"""A model's own tool format end to end: copies of the real SmolLM2 GGUF whose
``tokenizer.chat_template`` is replaced by Qwen2.5's, Llama 3.2's (Llama 3.1's custom-tool
format) and a Mistral v3 style template (every tensor and other key copied, gguf's
gguf_new_metadata approach), served by a real agent API and called with the official
`openai` client: required and named choices come back as calls the client parses (forced in
each family's own shape), streamed fragments assemble into the same call, and a conversation
carrying a call and its result renders through the template."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gguf
import openai
import pytest
from gguf.scripts.gguf_new_metadata import MetadataDetails, copy_with_new_metadata

from edgefleet.agent.api import create_app
from edgefleet.agent.api.gguf_template import read_template
from edgefleet.agent.api.tool_formats import HERMES, LLAMA3_JSON, MISTRAL, ToolFormat, template_format
from edgefleet.agent.runtimes import load_runtime
from edgefleet.agent.runtimes.model_table import ModelTable
from edgefleet.protos.fleet.v1 import common_pb2
from tests.integration.api_server import Recorder, serving, smollm2_file
from tests.integration.openai_agent import GET_TIME
from tests.unit.test_tool_formats import HISTORY, LLAMA32_TEMPLATE, MISTRAL_TEMPLATE, QWEN25_TEMPLATE, WEATHER

pytestmark = pytest.mark.integration

TEMPLATES = {"qwen25": QWEN25_TEMPLATE, "llama32": LLAMA32_TEMPLATE, "mistral": MISTRAL_TEMPLATE}
FORMATS: dict[str, ToolFormat] = {"qwen25": HERMES, "llama32": LLAMA3_JSON, "mistral": MISTRAL}
TOOLS: Any = [WEATHER, GET_TIME]
ASK: Any = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def template_copies(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """SmolLM2 with each template: every KV and tensor copied, the chat template replaced."""
    reader = gguf.GGUFReader(smollm2_file(), "r")
    arch = reader.get_field(gguf.Keys.General.ARCHITECTURE)
    assert arch is not None
    out: dict[str, Path] = {}
    for name, template in TEMPLATES.items():
        path = tmp_path_factory.mktemp("gguf") / f"smollm2-{name}.gguf"
        writer = gguf.GGUFWriter(path, arch=str(arch.contents()), endianess=reader.endianess)
        alignment = reader.get_field(gguf.Keys.General.ALIGNMENT)
        if alignment is not None:
            writer.data_alignment = int(alignment.contents())
        new = {gguf.Keys.Tokenizer.CHAT_TEMPLATE: MetadataDetails(gguf.GGUFValueType.STRING, template)}
        copy_with_new_metadata(reader, writer, new, [])
        out[name] = path
    return out


@pytest.fixture(scope="module", params=sorted(TEMPLATES))
def family(
    request: pytest.FixtureRequest, template_copies: dict[str, Path]
) -> Iterator[tuple[str, openai.OpenAI]]:
    name: str = request.param
    path = template_copies[name]
    found = read_template(path)
    assert found is not None and found.template == TEMPLATES[name]
    assert template_format(found.template) is FORMATS[name]
    runtime = load_runtime(fmt=common_pb2.MODEL_FORMAT_GGUF, model_path=path, model_id=name, n_ctx=2048)
    try:
        app = create_app(models=ModelTable(runtime), observer=Recorder())
        with serving(app) as base_url:
            yield name, openai.OpenAI(base_url=f"{base_url}/v1", api_key="x", max_retries=0, timeout=120)
    finally:
        runtime.unload()


def settings(name: str) -> dict[str, Any]:
    return {"model": name, "max_tokens": 80, "temperature": 0}


def check_call(call: Any, names: set[str]) -> dict[str, Any]:
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name in names
    arguments = json.loads(call.function.arguments)
    assert isinstance(arguments, dict) and isinstance(arguments.get("city"), str)
    return arguments


def test_required_choice_returns_a_call_in_the_models_format(family: tuple[str, openai.OpenAI]) -> None:
    name, client = family
    response = client.chat.completions.create(
        messages=ASK, tools=TOOLS, tool_choice="required", **settings(name)
    )
    choice = response.choices[0]
    assert choice.finish_reason == "tool_calls", choice
    assert choice.message.tool_calls
    for call in choice.message.tool_calls:
        check_call(call, {"get_weather", "get_time"})


def test_named_choice_calls_that_function(family: tuple[str, openai.OpenAI]) -> None:
    name, client = family
    response = client.chat.completions.create(
        messages=ASK,
        tools=TOOLS,
        tool_choice={"type": "function", "function": {"name": "get_time"}},
        **settings(name),
    )
    calls = response.choices[0].message.tool_calls
    assert calls is not None and len(calls) == 1
    check_call(calls[0], {"get_time"})


def test_streamed_fragments_assemble_into_the_call(family: tuple[str, openai.OpenAI]) -> None:
    name, client = family
    choice: Any = {"type": "function", "function": {"name": "get_weather"}}
    whole = client.chat.completions.create(messages=ASK, tools=TOOLS, tool_choice=choice, **settings(name))
    stream = client.chat.completions.create(
        messages=ASK, tools=TOOLS, tool_choice=choice, stream=True, **settings(name)
    )
    names: list[str] = []
    arguments: list[str] = []
    finish = None
    for chunk in stream:
        for delta_choice in chunk.choices:
            for call in delta_choice.delta.tool_calls or []:
                assert call.index == 0
                if call.function and call.function.name:
                    names.append(call.function.name)
                if call.function and call.function.arguments:
                    arguments.append(call.function.arguments)
            finish = delta_choice.finish_reason or finish
    assert names == ["get_weather"] and finish == "tool_calls"
    calls = whole.choices[0].message.tool_calls
    assert calls is not None
    assert json.loads("".join(arguments)) == json.loads(calls[0].function.arguments)


def test_a_call_and_its_result_render_through_the_template(family: tuple[str, openai.OpenAI]) -> None:
    name, client = family
    response = client.chat.completions.create(
        messages=HISTORY, tools=[WEATHER], tool_choice="auto", **settings(name)
    )
    assert response.choices[0].finish_reason in ("stop", "length", "tool_calls")
    # The model may answer with nothing; the point is the template took the call and result.
    assert response.usage is not None and response.usage.prompt_tokens > 40


def test_smollm2s_own_template_keeps_the_generic_format() -> None:
    """SmolLM2's template renders role and content only: the generic Hermes format is used
    (its end-to-end calls are tests/integration/test_openai_tools.py)."""
    found = read_template(smollm2_file())
    assert found is not None and found.bos_token == "<|im_start|>"
    assert template_format(found.template) is None
