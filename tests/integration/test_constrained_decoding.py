"""Constrained decoding on the ONNX Runtime and MLX adapters: structured output and forced
tool calls through the official `openai` client against a real agent, and the adapter itself.
Every case runs once per runtime (the test id names it), so the two adapters are held to the
same promises by the same code.

- onnx: a small ONNX decoder built here (tests.onnx_models), a bigram-with-attention toy fitted
  to a few English sentences that left alone writes prose, never JSON.
- mlx: a tiny random Llama converted and 4-bit quantized by mlx-lm (tests.mlx_models) that left
  alone writes gibberish. mlx-lm's ``generate_step`` builds the next step before handing out a
  token, which is the path the grammar's logits processor has to get right
  (MlxRuntime._generate).

So every reply that parses and validates does so because the grammar's mask left it no other
choice.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import jsonschema
import openai
import pytest

from edgefleet.agent.api import create_app
from edgefleet.agent.runtimes import load_runtime
from edgefleet.agent.runtimes.base import (
    ChatMessage,
    Constraint,
    ConstraintError,
    Runtime,
    SamplingParams,
    collect,
)
from edgefleet.agent.runtimes.constraints import json_schema_grammar, lark_grammar
from edgefleet.agent.runtimes.model_table import ModelTable
from edgefleet.protos.fleet.v1 import common_pb2
from tests.integration.api_server import Recorder, serving
from tests.mlx_models import CHAT_TEMPLATE, build_llama, mlx_variant
from tests.onnx_models import build_decoder_folder

pytestmark = pytest.mark.integration

MODEL_ID = "tiny"
N_CTX = 1024  # byte-level ONNX tokens too: room for the tool-call system prompt and a JSON object
MLX_WEIGHT_STD = 0.1  # peaked logits: the unconstrained MLX text varies token by token
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 16},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "pets": {"type": "array", "items": {"type": "string", "maxLength": 8}, "maxItems": 2},
    },
    "required": ["name", "age", "pets"],
    "additionalProperties": False,
}
SCHEMA_FORMAT: Any = {
    "type": "json_schema",
    "json_schema": {"name": "person", "schema": PERSON, "strict": True},
}
ASK = [{"role": "user", "content": "Say hello."}]
GBNF = 'root ::= ("yes" | "no") ", " [0-9] [0-9]? " cats"'
GBNF_TEXT = re.compile(r"(yes|no), [0-9][0-9]? cats")
LARK = 'start: WORD ("-" WORD)?\nWORD: /[a-z]{2,6}/'
LARK_TEXT = re.compile(r"[a-z]{2,6}(-[a-z]{2,6})?")
WEATHER_TOOL: Any = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 12}},
            "required": ["city"],
            "additionalProperties": False,
        },
    },
}


def load_onnx(root: Path) -> Runtime:
    folder = build_decoder_folder(root / "chat", kv_cache=True, max_positions=N_CTX)
    return load_runtime(
        fmt=common_pb2.MODEL_FORMAT_ONNX, model_path=folder, model_id=MODEL_ID, n_ctx=N_CTX, n_threads=1
    )


def load_mlx(root: Path) -> Runtime:
    source = build_llama(root / "chat-src", chat_template=CHAT_TEMPLATE, weight_std=MLX_WEIGHT_STD)
    folder = mlx_variant(source, root / "chat-q4")
    return load_runtime(fmt=common_pb2.MODEL_FORMAT_MLX, model_path=folder, model_id=MODEL_ID, n_ctx=N_CTX)


@dataclass(frozen=True)
class Backend:
    """One runtime under test and the little that differs between them."""

    name: str
    load: Callable[[Path], Runtime]
    tool_call_max_tokens: int  # the ONNX toy's byte-level tokens need more room for a call


BACKENDS = {
    "onnx": Backend("onnx", load_onnx, tool_call_max_tokens=380),
    "mlx": Backend("mlx", load_mlx, tool_call_max_tokens=300),
}
NEEDS_MLX = pytest.mark.skipif(
    find_spec("mlx_lm") is None, reason="needs mlx-lm (pip install 'mlx[cpu]' mlx-lm)"
)
ONNX = pytest.param("onnx", id="onnx")
MLX = pytest.param("mlx", id="mlx", marks=NEEDS_MLX)


@pytest.fixture(scope="module", params=[ONNX, MLX])
def backend(request: pytest.FixtureRequest) -> Backend:
    return BACKENDS[request.param]


@pytest.fixture(scope="module")
def runtime(backend: Backend, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Runtime]:
    loaded = backend.load(tmp_path_factory.mktemp(f"{backend.name}-constrained"))
    try:
        yield loaded
    finally:
        loaded.unload()


@pytest.fixture(scope="module")
def client(runtime: Runtime) -> Iterator[openai.OpenAI]:
    app = create_app(models=ModelTable(runtime), observer=Recorder())
    with serving(app) as base_url:
        yield openai.OpenAI(base_url=f"{base_url}/v1", api_key="not-needed", max_retries=0, timeout=120)


def streamed(client: openai.OpenAI, **kwargs: Any) -> tuple[str, str | None]:
    chunks = list(client.chat.completions.create(model=MODEL_ID, stream=True, **kwargs))
    text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    return text, chunks[-1].choices[0].finish_reason


def test_the_runtime_says_it_constrains(runtime: Runtime) -> None:
    assert runtime.describe().constrained_decoding


def test_unconstrained_text_is_not_json(client: openai.OpenAI) -> None:
    """The premise of the tests below: without a grammar neither model writes JSON."""
    response = client.chat.completions.create(
        model=MODEL_ID,
        messages=ASK,  # type: ignore[arg-type]
        max_tokens=60,
        temperature=0,
    )
    with pytest.raises(json.JSONDecodeError):
        json.loads(response.choices[0].message.content or "")


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_json_schema_validates(client: openai.OpenAI, seed: int) -> None:
    response = client.chat.completions.create(
        model=MODEL_ID,
        messages=ASK,  # type: ignore[arg-type]
        response_format=SCHEMA_FORMAT,
        max_tokens=200,
        temperature=1.0,
        seed=seed,
    )
    assert response.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(response.choices[0].message.content or ""), PERSON)


def test_json_object_parses(client: openai.OpenAI) -> None:
    response = client.chat.completions.create(
        model=MODEL_ID,
        messages=ASK,  # type: ignore[arg-type]
        response_format={"type": "json_object"},
        max_tokens=200,
        temperature=0.7,
        seed=5,
    )
    text = response.choices[0].message.content or ""
    if response.choices[0].finish_reason == "stop":  # an object may be cut by max_tokens
        assert isinstance(json.loads(text), dict)
    assert text.startswith("{")


@pytest.mark.parametrize("seed", [1, 2])
def test_streamed_and_not_streamed_agree(client: openai.OpenAI, seed: int) -> None:
    kwargs: Any = {
        "messages": ASK,
        "response_format": SCHEMA_FORMAT,
        "max_tokens": 200,
        "temperature": 1.0,
        "seed": seed,
    }
    whole = client.chat.completions.create(model=MODEL_ID, **kwargs)
    text, finish = streamed(client, **kwargs)
    assert (text, finish) == (whole.choices[0].message.content, whole.choices[0].finish_reason)
    jsonschema.validate(json.loads(text), PERSON)


@pytest.mark.parametrize("syntax", ["gbnf", "lark"])
def test_grammar_is_obeyed(client: openai.OpenAI, syntax: str) -> None:
    grammar, shape = (GBNF, GBNF_TEXT) if syntax == "gbnf" else (LARK, LARK_TEXT)
    for seed in (1, 2, 3):
        response = client.chat.completions.create(
            model=MODEL_ID,
            messages=ASK,  # type: ignore[arg-type]
            max_tokens=40,
            temperature=1.0,
            seed=seed,
            extra_body={"response_format": {"type": "grammar", "syntax": syntax, "grammar": grammar}},
        )
        assert response.choices[0].finish_reason == "stop"
        assert shape.fullmatch(response.choices[0].message.content or "")


def test_forced_tool_call_is_well_formed(client: openai.OpenAI, backend: Backend) -> None:
    response = client.chat.completions.create(
        model=MODEL_ID,
        messages=[{"role": "user", "content": "What is the weather in Paris?"}],
        tools=[WEATHER_TOOL],
        tool_choice="required",
        max_tokens=backend.tool_call_max_tokens,
        temperature=1.0,
        seed=4,
    )
    calls = response.choices[0].message.tool_calls or []
    assert response.choices[0].finish_reason == "tool_calls" and calls
    for call in calls:
        assert call.function.name == "get_weather"  # type: ignore[union-attr]
        arguments = json.loads(call.function.arguments)  # type: ignore[union-attr]
        jsonschema.validate(arguments, WEATHER_TOOL["function"]["parameters"])


def test_an_uncompilable_schema_is_a_400(client: openai.OpenAI) -> None:
    bad: Any = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model=MODEL_ID, messages=ASK, response_format=bad)  # type: ignore[arg-type]
    assert refused.value.body is not None and "response_format" in str(refused.value.body)


def test_the_runtime_refuses_a_broken_grammar_before_generating(runtime: Runtime) -> None:
    with pytest.raises(ConstraintError):
        runtime.chat_stream(
            [ChatMessage(role="user", content="Hi")], SamplingParams(constraint=Constraint("not a grammar"))
        )


def test_runtime_stream_and_completion_agree(runtime: Runtime) -> None:
    """On the adapter itself: the same seeded constrained request, collected and streamed,
    gives the same text and token count, ends at the grammar's end ("stop") and validates."""
    params = SamplingParams(
        max_tokens=200, temperature=1.0, seed=9, constraint=Constraint(json_schema_grammar(PERSON))
    )
    messages = [ChatMessage(role="user", content="Say hello.")]
    whole = runtime.chat(messages, params)
    stream = runtime.chat_stream(messages, params)
    deltas = list(stream)
    assert "".join(delta.text for delta in deltas) == whole.text
    assert stream.completion_tokens == whole.completion_tokens
    assert deltas[-1].finish_reason == whole.finish_reason == "stop"
    jsonschema.validate(json.loads(whole.text), PERSON)


def test_completions_obey_a_grammar(runtime: Runtime) -> None:
    grammar = Constraint(lark_grammar(GBNF, gbnf=True))
    params = SamplingParams(max_tokens=40, temperature=1.0, seed=2, constraint=grammar)
    result = collect(runtime.complete_stream("The capital", params))
    assert result.finish_reason == "stop" and GBNF_TEXT.fullmatch(result.text)


def test_a_reply_cut_by_max_tokens_is_a_length_finish(runtime: Runtime) -> None:
    """The token limit still applies under a grammar: the reply is the grammar's prefix so far."""
    params = SamplingParams(
        max_tokens=5, temperature=1.0, seed=3, constraint=Constraint(json_schema_grammar(PERSON))
    )
    result = runtime.chat([ChatMessage(role="user", content="Say hello.")], params)
    assert (result.finish_reason, result.completion_tokens) == ("length", 5)
    assert result.text.startswith('{"')


def test_penalties_and_top_k_stay_inside_the_grammar(runtime: Runtime) -> None:
    params = SamplingParams(
        max_tokens=200,
        temperature=1.3,
        top_k=20,
        top_p=0.9,
        presence_penalty=1.5,
        frequency_penalty=1.0,
        seed=6,
        constraint=Constraint(json_schema_grammar(PERSON)),
    )
    result = runtime.chat([ChatMessage(role="user", content="Say hello.")], params)
    assert result.finish_reason == "stop"
    jsonschema.validate(json.loads(result.text), PERSON)


@pytest.mark.parametrize("backend", [MLX], indirect=True)
def test_a_prompt_prefilled_in_chunks_keeps_the_grammar_aligned(runtime: Runtime) -> None:
    """mlx-lm prefills a long prompt in 512-token chunks; the grammar's processor must still
    tell the prompt from the generated tokens in the history it is handed."""
    message = ChatMessage(role="user", content=" ".join(f"word{i}" for i in range(150)))
    params = SamplingParams(
        max_tokens=100, temperature=1.0, seed=1, constraint=Constraint(json_schema_grammar(PERSON))
    )
    result = runtime.chat([message], params)
    assert result.prompt_tokens > 512
    assert result.finish_reason == "stop"
    jsonschema.validate(json.loads(result.text), PERSON)
