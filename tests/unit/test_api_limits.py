"""What one API request may send: body bytes and nesting, prompt characters, item counts, valid text.

Every refusal happens before the model is leased or anything is tokenized (the fake runtime
records every prompt it is given), arrives in the OpenAI error shape naming the limit or the
field, and is counted like any other failed request.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any, get_args

import pytest
from fastapi.testclient import TestClient
from pydantic import BaseModel

from edgefleet.agent.api import create_app
from edgefleet.agent.api.app import DeviceAPI
from edgefleet.agent.api.errors import APIError
from edgefleet.agent.api.framing import FramingGuard
from edgefleet.agent.api.limits import RequestLimits, json_depth
from edgefleet.agent.api.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    EmbeddingRequest,
    OpenAIRequestModel,
)
from edgefleet.agent.config import AgentConfig
from edgefleet.agent.runtimes.model_table import ModelTable
from tests.unit.test_api import MODEL, FakeRuntime, Recorder, assert_openai_error

LIMITS = RequestLimits(
    max_body_bytes=64 * 1024, max_prompt_chars=1000, max_messages=8, max_embedding_inputs=4, max_json_depth=16
)
CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
EMBEDDINGS = "/v1/embeddings"
SURROGATE = "\ud800"


@pytest.fixture
def runtime() -> FakeRuntime:
    return FakeRuntime()


@pytest.fixture
def recorder() -> Recorder:
    return Recorder()


@pytest.fixture
def client(runtime: FakeRuntime, recorder: Recorder) -> Iterator[TestClient]:
    app = create_app(models=ModelTable(runtime), observer=recorder, request_limits=LIMITS)
    with TestClient(app, raise_server_exceptions=False) as test_client:
        yield test_client


def chat(content: str = "Hello", **fields: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "user", "content": content}], **fields}


def post_raw(client: TestClient, path: str, body: str) -> Any:
    """POST JSON text as-is: `json=` could not carry a lone surrogate, nor NaN literals."""
    data = body.encode("utf-8", "surrogatepass")
    return client.post(path, content=data, headers={"content-type": "application/json"})


def assert_untouched(runtime: FakeRuntime) -> None:
    """Nothing reached the model: no prompt, no embedding, no lease left behind."""
    assert runtime.prompts == [] and runtime.embedded == []


# --- body bytes ----------------------------------------------------------------------------


def test_a_body_over_the_limit_is_413_naming_it(client: TestClient, runtime: FakeRuntime) -> None:
    response = client.post(CHAT, json=chat("x" * LIMITS.max_body_bytes))
    error = assert_openai_error(response, 413, "request_too_large")
    assert "max_body_bytes" in error["message"] and str(LIMITS.max_body_bytes) in error["message"]
    assert response.headers["connection"] == "close"
    assert_untouched(runtime)


def test_a_chunked_body_over_the_limit_is_413(
    client: TestClient, runtime: FakeRuntime, recorder: Recorder
) -> None:
    def chunks() -> Iterator[bytes]:  # no Content-Length: only counting while reading can stop it
        for _ in range(100):
            yield b" " * 4096

    response = client.post(CHAT, content=chunks(), headers={"content-type": "application/json"})
    assert_openai_error(response, 413, "request_too_large")
    assert_untouched(runtime)
    assert recorder.only().error == "request_too_large"


def test_a_body_at_the_limit_is_served(client: TestClient) -> None:
    body = json.dumps(chat("Hello"))
    padded = body[:-1] + " " * (LIMITS.max_body_bytes - len(body)) + "}"
    assert len(padded.encode()) == LIMITS.max_body_bytes
    assert post_raw(client, CHAT, padded).status_code == 200


# --- JSON nesting ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "extra",
    ["[" * 17 + "]" * 17, '{"a":' * 17 + "1" + "}" * 17, "[" * 30_000 + "]" * 30_000],
    ids=["arrays", "objects", "very-deep"],
)
def test_deep_json_is_400_naming_the_limit(client: TestClient, runtime: FakeRuntime, extra: str) -> None:
    body = json.dumps(chat())[:-1] + f', "tools": {extra}}}'
    error = assert_openai_error(post_raw(client, CHAT, body), 400, "json_too_deep")
    assert "max_json_depth" in error["message"]
    assert_untouched(runtime)


def test_brackets_inside_strings_are_not_nesting(client: TestClient) -> None:
    response = client.post(CHAT, json=chat('[[[[[[[[[[[[[[[[[[[[ "\\" {{{{{{{{{{{{{{{{{{{{'))
    assert response.status_code == 200


@pytest.mark.parametrize(
    ("text", "depth"),
    [
        (b"{}", 1),
        (b'{"a": [1, {"b": []}]}', 4),
        (b'{"a": "[[[[", "b": ["]]]]"]}', 2),
        (b'{"a": "\\"[[[[\\"", "b": [[1]]}', 3),
        (b'["\\\\", ["\\\\"]]', 2),
        (b'"never closed [[[[', 0),
        (b'["unterminated \\', 1),
        (b"[[[[", 4),
    ],
)
def test_json_depth_skips_strings_and_escapes(text: bytes, depth: int) -> None:
    assert json_depth(text) == depth


# --- prompt characters and item counts -------------------------------------------------------


def test_chat_text_over_the_limit_is_400_before_tokenizing(
    client: TestClient, runtime: FakeRuntime, recorder: Recorder
) -> None:
    half = "x" * (LIMITS.max_prompt_chars // 2 + 1)  # neither message alone is too long
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": half}, {"role": "user", "content": half}],
    }
    error = assert_openai_error(client.post(CHAT, json=body), 400, "prompt_too_large")
    assert error["param"] == "messages" and "max_prompt_chars" in error["message"]
    assert_untouched(runtime)
    assert recorder.only().error == "prompt_too_large"


def test_content_parts_count_towards_the_limit(client: TestClient, runtime: FakeRuntime) -> None:
    parts = [{"type": "text", "text": "x" * 600}, {"type": "text", "text": "y" * 600}]
    body = {"model": MODEL, "messages": [{"role": "user", "content": parts}]}
    assert_openai_error(client.post(CHAT, json=body), 400, "prompt_too_large")
    assert_untouched(runtime)


def test_completion_prompt_over_the_limit_is_400(client: TestClient, runtime: FakeRuntime) -> None:
    body = {"model": MODEL, "prompt": "x" * (LIMITS.max_prompt_chars + 1)}
    error = assert_openai_error(client.post(COMPLETIONS, json=body), 400, "prompt_too_large")
    assert error["param"] == "prompt"
    assert_untouched(runtime)


def test_embedding_inputs_over_the_character_limit_are_400(client: TestClient, runtime: FakeRuntime) -> None:
    body = {"model": MODEL, "input": ["x" * 400, "y" * 400, "z" * 400]}
    error = assert_openai_error(client.post(EMBEDDINGS, json=body), 400, "prompt_too_large")
    assert error["param"] == "input"
    assert_untouched(runtime)


def test_too_many_messages_is_400_naming_the_limit(client: TestClient, runtime: FakeRuntime) -> None:
    messages = [{"role": "user", "content": "hi"}] * (LIMITS.max_messages + 1)
    error = assert_openai_error(
        client.post(CHAT, json={"model": MODEL, "messages": messages}), 400, "too_many_items"
    )
    assert error["param"] == "messages" and "max_messages" in error["message"]
    assert_untouched(runtime)


def test_too_many_embedding_inputs_is_400_naming_the_limit(client: TestClient, runtime: FakeRuntime) -> None:
    body = {"model": MODEL, "input": ["a"] * (LIMITS.max_embedding_inputs + 1)}
    error = assert_openai_error(client.post(EMBEDDINGS, json=body), 400, "too_many_items")
    assert error["param"] == "input" and "max_embedding_inputs" in error["message"]
    assert_untouched(runtime)


def test_requests_within_the_limits_are_served(client: TestClient, runtime: FakeRuntime) -> None:
    messages = [{"role": "user", "content": "x" * 100}] * LIMITS.max_messages
    assert client.post(CHAT, json={"model": MODEL, "messages": messages}).status_code == 200
    inputs = ["x" * 250] * LIMITS.max_embedding_inputs
    assert client.post(EMBEDDINGS, json={"model": MODEL, "input": inputs}).status_code == 200


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (chat(model="m" * 257), "model"),
        (chat(user="u" * 257), "user"),
        (
            {"model": MODEL, "messages": [{"role": "user", "content": "hi", "name": "n" * 257}]},
            "messages.0.name",
        ),
        (chat(stop="s" * 513), "stop"),
        (chat(stop=["a", "s" * 513]), "stop"),
    ],
    ids=["model", "user", "name", "stop", "stop-list"],
)
def test_names_and_stop_sequences_are_bounded(
    client: TestClient, runtime: FakeRuntime, body: dict[str, Any], param: str
) -> None:
    assert assert_openai_error(client.post(CHAT, json=body), 400)["param"] == param
    assert_untouched(runtime)


# --- valid text: lone surrogates in any string field -------------------------------------------

MARK = "@LONE@"  # where the JSON text gets the escape of a lone surrogate


def with_surrogate(body: dict[str, Any]) -> str:
    return json.dumps(body).replace(MARK, "\\ud800")


def message(**fields: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "user", "content": "hi", **fields}]}


SURROGATE_BODIES = [
    (CHAT, chat(model=MARK), "model"),
    (CHAT, chat(MARK), "messages.0.content"),
    (CHAT, message(content=[{"type": "text", "text": f"a{MARK}b"}]), "messages.0.content.0.text"),
    (CHAT, message(name=MARK), "messages.0.name"),
    (CHAT, chat(stop=MARK), "stop"),
    (CHAT, chat(stop=["a", MARK]), "stop"),
    (CHAT, chat(user=MARK), "user"),
    (COMPLETIONS, {"model": MARK, "prompt": "hi"}, "model"),
    (COMPLETIONS, {"model": MODEL, "prompt": MARK}, "prompt"),
    (COMPLETIONS, {"model": MODEL, "prompt": [MARK]}, "prompt"),
    (COMPLETIONS, {"model": MODEL, "prompt": "hi", "stop": [MARK]}, "stop"),
    (COMPLETIONS, {"model": MODEL, "prompt": "hi", "user": MARK}, "user"),
    (EMBEDDINGS, {"model": MARK, "input": "hi"}, "model"),
    (EMBEDDINGS, {"model": MODEL, "input": MARK}, "input"),
    (EMBEDDINGS, {"model": MODEL, "input": ["a", f"b{MARK}c"]}, "input"),
    (EMBEDDINGS, {"model": MODEL, "input": "hi", "user": MARK}, "user"),
]


@pytest.mark.parametrize(
    ("path", "body", "param"),
    SURROGATE_BODIES,
    ids=[f"{path}-{param}" for path, _, param in SURROGATE_BODIES],
)
def test_a_lone_surrogate_is_400_naming_the_field(
    client: TestClient, runtime: FakeRuntime, recorder: Recorder, path: str, body: dict[str, Any], param: str
) -> None:
    error = assert_openai_error(post_raw(client, path, with_surrogate(body)), 400, "invalid_value")
    assert error["param"] == param
    assert_untouched(runtime)
    assert recorder.only().error == "invalid_value"


def test_every_model_in_a_request_refuses_lone_surrogates() -> None:
    """The surrogate check lives on OpenAIRequestModel; a nested model without it would let one through."""

    def nested_models(model: type[BaseModel]) -> Iterator[type[BaseModel]]:
        yield model
        for field in model.model_fields.values():
            for kind in _flatten(field.annotation):
                if isinstance(kind, type) and issubclass(kind, BaseModel):
                    yield from nested_models(kind)

    for request in (ChatCompletionRequest, CompletionRequest, EmbeddingRequest):
        for model in nested_models(request):
            assert issubclass(model, OpenAIRequestModel), model


def _flatten(annotation: Any) -> Iterator[Any]:
    yield annotation
    for argument in get_args(annotation):
        yield from _flatten(argument)


def test_paired_surrogates_and_other_text_are_fine(client: TestClient, runtime: FakeRuntime) -> None:
    body = json.dumps({"model": MODEL, "prompt": "emoji \U0001f600, accents \u00e9, CJK \u4e2d"})
    assert "\\ud83d\\ude00" in body  # the emoji travels as a surrogate pair
    assert post_raw(client, COMPLETIONS, body).status_code == 200
    assert runtime.prompts == ["emoji \U0001f600, accents \u00e9, CJK \u4e2d"]


def test_an_error_quoting_a_lone_surrogate_still_encodes() -> None:
    response = APIError(404, f"The model `{SURROGATE}` does not exist", param=SURROGATE).response()
    error = json.loads(response.body)["error"]
    assert error["message"] == "The model `\\ud800` does not exist" and error["param"] == "\\ud800"


# --- numbers and shapes ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "fields", "param"),
    [
        (CHAT, '"max_tokens": 1' + "0" * 40, "max_tokens"),
        (CHAT, '"max_completion_tokens": 1' + "0" * 40, "max_completion_tokens"),
        (COMPLETIONS, '"max_tokens": 1e400', "max_tokens"),
        (CHAT, '"temperature": NaN', "temperature"),
        (CHAT, '"top_p": Infinity', "top_p"),
        (CHAT, '"frequency_penalty": -Infinity', "frequency_penalty"),
        (CHAT, '"n": 1' + "0" * 40, "n"),
        (EMBEDDINGS, '"dimensions": 1' + "0" * 40, "dimensions"),
        (
            CHAT,
            '"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]',
            "messages.0.content.0.text",
        ),
        (CHAT, '"messages": []', "messages"),
        (COMPLETIONS, '"prompt": []', "prompt"),
        (EMBEDDINGS, '"input": []', "input"),
        (CHAT, '"stream_options": {"include_usage": "yes"}', "stream_options.include_usage"),
    ],
)
def test_hostile_values_are_400_naming_the_field(
    client: TestClient, runtime: FakeRuntime, path: str, fields: str, param: str
) -> None:
    base = {
        CHAT: chat(),
        COMPLETIONS: {"model": MODEL, "prompt": "hi"},
        EMBEDDINGS: {"model": MODEL, "input": "hi"},
    }
    body = json.loads(json.dumps(base[path]))
    text = json.dumps({key: value for key, value in body.items() if f'"{key}"' not in fields})
    error = assert_openai_error(post_raw(client, path, text[:-1] + ", " + fields + "}"), 400)
    assert error["param"] == param
    assert_untouched(runtime)


# --- framing (headers alone; the real-socket behaviour is in tests/integration) ------------------


@pytest.mark.parametrize(
    "headers",
    [
        [(b"transfer-encoding", b"chunked"), (b"content-length", b"5")],
        [(b"content-length", b"5"), (b"content-length", b"6")],
        [(b"content-length", b"5, 6")],
        [(b"content-length", b"-1")],
        [(b"transfer-encoding", b"gzip, chunked")],
        [(b"transfer-encoding", b"chunked"), (b"transfer-encoding", b"chunked")],
        [(b"transfer-encoding", b"identity")],
    ],
)
def test_ambiguous_framing_is_refused_with_close(headers: list[tuple[bytes, bytes]]) -> None:
    refusal = FramingGuard(DeviceAPI(request_limits=LIMITS), max_body_bytes=100).refusal(headers)
    assert refusal is not None and refusal.status == 400 and refusal.info.code == "invalid_framing"
    assert refusal.headers == {"Connection": "close"}


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        ([(b"transfer-encoding", b"chunked")], None),
        ([(b"transfer-encoding", b" Chunked ")], None),
        ([(b"content-length", b"100")], None),
        ([(b"content-length", b"100, 100")], None),
        ([(b"content-length", b"101")], 413),
        ([(b"content-length", b"9" * 5000)], 413),
    ],
)
def test_sound_framing_passes_and_announced_size_is_checked(
    headers: list[tuple[bytes, bytes]], status: int | None
) -> None:
    refusal = FramingGuard(DeviceAPI(request_limits=LIMITS), max_body_bytes=100).refusal(headers)
    assert (refusal and refusal.status) == status


# --- configuration ----------------------------------------------------------------------------


def test_agent_defaults_are_the_api_defaults() -> None:
    config = AgentConfig(controlplane="cp:1", state_dir=Path("/nonexistent"), trust_path=Path("/nonexistent"))
    defaults = RequestLimits()
    assert config.max_request_bytes == defaults.max_body_bytes
    assert config.max_prompt_chars == defaults.max_prompt_chars
    assert config.max_messages == defaults.max_messages
    assert config.max_embedding_inputs == defaults.max_embedding_inputs
    assert config.request_body_timeout_seconds == defaults.body_timeout_seconds


@pytest.mark.parametrize(
    "fields",
    [{"max_body_bytes": 0}, {"max_prompt_chars": 0}, {"max_embedding_inputs": 4096}, {"max_json_depth": 2}],
)
def test_nonsense_limits_are_refused(fields: dict[str, int]) -> None:
    with pytest.raises(ValueError, match=next(iter(fields))):
        RequestLimits(**fields)
