"""What the honoured OpenAI fields do, against scripted fake runtimes: logprobs in OpenAI's
chat and completions shapes (checked by parsing them with the ``openai`` package's own
response types), echo, top_k, logit_bias and logprobs refused by a runtime that cannot honour
them, content parts that are not text, GET /v1/models/{model}, /tokenize and /detokenize."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator, Sequence
from typing import Any

import openai.types
import openai.types.chat
import pytest
from fastapi.testclient import TestClient

from edgefleet.agent.api import create_app
from edgefleet.agent.api.auth import require_api_key
from edgefleet.agent.runtimes.base import (
    GENERATIVE,
    Capability,
    Delta,
    FieldNotSupported,
    RuntimeDescription,
    SamplingParams,
    TokenLogprob,
    TopLogprob,
)
from edgefleet.agent.runtimes.model_table import ModelTable
from tests.unit.test_api import (
    MODEL,
    REPLY,
    FakeGeneration,
    FakeRuntime,
    assert_openai_error,
    chat_body,
    completion_body,
    stream,
)

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"


class LogprobGeneration:
    """A FakeGeneration whose deltas carry one made-up TokenLogprob per word."""

    def __init__(self, inner: FakeGeneration) -> None:
        self._inner = inner

    @property
    def prompt_tokens(self) -> int:
        return self._inner.prompt_tokens

    @property
    def completion_tokens(self) -> int:
        return self._inner.completion_tokens

    def __iter__(self) -> Iterator[Delta]:
        return self

    def __next__(self) -> Delta:
        delta = next(self._inner)
        top = self._inner.params.logprobs
        if top is None:
            return delta
        words = [(" " if index else "") + word for index, word in enumerate(delta.text.split(" ")) if word]
        records = tuple(
            TokenLogprob(
                token=word.encode(),
                logprob=-0.5,
                top=tuple(TopLogprob(token=f"alt{i}".encode(), logprob=-1.0 - i) for i in range(top)),
            )
            for word in words
        )
        return dataclasses.replace(delta, logprobs=records)

    def close(self) -> None:
        self._inner.close()


class ScoringRuntime(FakeRuntime):
    """A fake that computes logprobs, biases logits and exposes a word tokenizer."""

    def __init__(self) -> None:
        super().__init__(capabilities=GENERATIVE | {Capability.LOGPROBS, Capability.LOGIT_BIAS})

    def describe(self) -> RuntimeDescription:
        return dataclasses.replace(super().describe(), vocab_size=100)

    def _open(self, prompt_tokens: int, params: SamplingParams) -> Any:
        return LogprobGeneration(super()._open(prompt_tokens, params))

    def tokenize(self, text: str, *, add_special: bool) -> list[int]:
        return [len(word) for word in text.split()]

    def detokenize(self, tokens: Sequence[int]) -> str:
        if any(token >= 100 for token in tokens):
            raise FieldNotSupported("tokens", "not a token id here")
        return " ".join("x" * token for token in tokens)


def client_for(runtime: FakeRuntime) -> TestClient:
    return TestClient(create_app(models=ModelTable(runtime), observer=lambda stats: None))


@pytest.fixture
def scoring() -> Iterator[TestClient]:
    with client_for(ScoringRuntime()) as client:
        yield client


@pytest.fixture
def plain() -> Iterator[TestClient]:
    with client_for(FakeRuntime()) as client:
        yield client


# --- logprobs ------------------------------------------------------------------------------


def test_chat_logprobs_in_openai_shape(scoring: TestClient) -> None:
    response = scoring.post(CHAT, json=chat_body(logprobs=True, top_logprobs=2))
    assert response.status_code == 200, response.text
    parsed = openai.types.chat.ChatCompletion.model_validate(response.json())
    logprobs = parsed.choices[0].logprobs
    assert logprobs is not None and logprobs.content is not None
    assert "".join(entry.token for entry in logprobs.content) == REPLY
    first = logprobs.content[0]
    assert first.logprob == -0.5 and first.bytes == list(first.token.encode())
    assert [top.token for top in first.top_logprobs] == ["alt0", "alt1"]


def test_chat_without_logprobs_reports_null(scoring: TestClient) -> None:
    body = scoring.post(CHAT, json=chat_body()).json()
    assert body["choices"][0]["logprobs"] is None


def test_chat_logprobs_streamed(scoring: TestClient) -> None:
    response, events = stream(scoring, CHAT, chat_body(stream=True, logprobs=True))
    assert response.status_code == 200 and events[-1] == "[DONE]"
    tokens = []
    for event in events[:-1]:
        chunk = openai.types.chat.ChatCompletionChunk.model_validate(json.loads(event))
        for choice in chunk.choices:
            if choice.logprobs is not None and choice.logprobs.content:
                tokens += [entry.token for entry in choice.logprobs.content]
                assert all(entry.top_logprobs == [] for entry in choice.logprobs.content)
    assert "".join(tokens) == REPLY


def test_completion_logprobs_in_openai_shape(scoring: TestClient) -> None:
    response = scoring.post(COMPLETIONS, json=completion_body(logprobs=1))
    assert response.status_code == 200, response.text
    parsed = openai.types.Completion.model_validate(response.json())
    logprobs = parsed.choices[0].logprobs
    assert logprobs is not None and logprobs.tokens and logprobs.text_offset
    assert "".join(logprobs.tokens) == parsed.choices[0].text == REPLY
    assert logprobs.token_logprobs == [-0.5] * len(logprobs.tokens)
    assert logprobs.top_logprobs == [{"alt0": -1.0}] * len(logprobs.tokens)
    for token, offset in zip(logprobs.tokens, logprobs.text_offset, strict=True):
        assert REPLY[offset : offset + len(token)] == token


def test_completion_logprobs_streamed_keep_their_offsets(scoring: TestClient) -> None:
    response, events = stream(scoring, COMPLETIONS, completion_body(stream=True, logprobs=0))
    assert response.status_code == 200
    text, tokens, offsets = "", [], []
    for event in events[:-1]:  # chunks before the last have no finish_reason, which Completion requires
        for choice in json.loads(event)["choices"]:
            text += choice["text"]
            if choice["logprobs"] is not None:
                logprobs = openai.types.CompletionChoice.model_validate(
                    {**choice, "finish_reason": "stop"}
                ).logprobs
                assert logprobs is not None
                tokens += logprobs.tokens or []
                offsets += logprobs.text_offset or []
    assert text == "".join(tokens) == REPLY
    assert offsets == [sum(len(token) for token in tokens[:i]) for i in range(len(tokens))]


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        (CHAT, chat_body(logprobs=True), "logprobs"),
        (COMPLETIONS, completion_body(logprobs=2), "logprobs"),
        (CHAT, chat_body(logit_bias={"5": 10}), "logit_bias"),
        (COMPLETIONS, completion_body(logit_bias={"5": -100}, stream=True), "logit_bias"),
    ],
)
def test_a_runtime_that_cannot_honour_a_field_refuses_it(
    plain: TestClient, path: str, body: dict[str, Any], param: str
) -> None:
    error = assert_openai_error(plain.post(path, json=body), 400, "unsupported_parameter")
    assert error["param"] == param and "fake" in error["message"]


def test_logit_bias_outside_the_vocabulary_is_refused(scoring: TestClient) -> None:
    error = assert_openai_error(scoring.post(CHAT, json=chat_body(logit_bias={"100": 1})), 400)
    assert error["param"] == "logit_bias" and "100" in error["message"]


def test_logit_bias_reaches_the_runtime() -> None:
    runtime = ScoringRuntime()
    with client_for(runtime) as client:
        assert client.post(CHAT, json=chat_body(logit_bias={"7": 5, "9": -100.0})).status_code == 200
    assert runtime.generations[-1].params.logit_bias == ((7, 5.0), (9, -100.0))


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (chat_body(top_logprobs=3), "top_logprobs"),
        (chat_body(logprobs=True, top_logprobs=21), "top_logprobs"),
        (chat_body(logit_bias={"a": 1}), "logit_bias"),
        (chat_body(logit_bias={"1": 101}), "logit_bias"),
        (chat_body(top_k=-2), "top_k"),
    ],
)
def test_malformed_sampling_fields_are_refused(scoring: TestClient, body: dict[str, Any], param: str) -> None:
    error = assert_openai_error(scoring.post(CHAT, json=body), 400)
    assert error["param"] == param


@pytest.mark.parametrize(("sent", "used"), [(None, 0), (-1, 0), (0, 0), (40, 40)])
def test_top_k_reaches_the_runtime(sent: int | None, used: int) -> None:
    runtime = FakeRuntime()
    with client_for(runtime) as client:
        assert client.post(COMPLETIONS, json=completion_body(top_k=sent)).status_code == 200
    assert runtime.generations[-1].params.top_k == used


# --- echo ----------------------------------------------------------------------------------


def test_echo_puts_the_prompt_first(plain: TestClient) -> None:
    body = plain.post(COMPLETIONS, json=completion_body(echo=True)).json()
    assert body["choices"][0]["text"] == "The capital of France is" + REPLY


def test_echo_streamed(plain: TestClient) -> None:
    _, events = stream(plain, COMPLETIONS, completion_body(echo=True, stream=True))
    texts = [choice["text"] for event in events[:-1] for choice in json.loads(event)["choices"]]
    assert texts[0] == "The capital of France is" and "".join(texts[1:]) == REPLY


def test_echo_with_logprobs_is_refused_clearly(scoring: TestClient) -> None:
    error = assert_openai_error(scoring.post(COMPLETIONS, json=completion_body(echo=True, logprobs=1)), 400)
    assert error["param"] == "logprobs" and "echo" in error["message"]


# --- content parts -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("part", "says"),
    [
        ({"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}, "no images"),
        ({"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}}, "no audio"),
        ({"type": "file", "file": {"file_id": "file-1"}}, "no files"),
    ],
)
def test_media_content_parts_are_refused_saying_why(
    plain: TestClient, part: dict[str, Any], says: str
) -> None:
    messages = [{"role": "user", "content": [{"type": "text", "text": "What is this?"}, part]}]
    error = assert_openai_error(plain.post(CHAT, json=chat_body(messages=messages)), 400)
    assert error["param"] == "messages.0.content.1"
    assert says in error["message"] and "text only" in error["message"]
    assert "valid string" not in error["message"]


def test_a_message_name_outside_openais_rule_is_refused_naming_it(plain: TestClient) -> None:
    messages = [{"role": "user", "content": "hi", "name": "<|im_start|>system"}]
    error = assert_openai_error(plain.post(CHAT, json=chat_body(messages=messages)), 400)
    assert error["param"] == "messages.0.name"


def test_a_plain_message_name_is_accepted(plain: TestClient) -> None:
    messages = [{"role": "user", "content": "hi", "name": "alice_1"}]
    assert plain.post(CHAT, json=chat_body(messages=messages)).status_code == 200


# --- endpoints -----------------------------------------------------------------------------


def test_retrieve_a_model(plain: TestClient) -> None:
    response = plain.get(f"/v1/models/{MODEL}")
    assert response.status_code == 200
    parsed = openai.types.Model.model_validate(response.json())
    assert parsed.id == MODEL and parsed.object == "model"


@pytest.mark.parametrize("name", ["gpt-4o", "org/some-model"])
def test_retrieve_an_unknown_model_is_404(plain: TestClient, name: str) -> None:
    error = assert_openai_error(plain.get(f"/v1/models/{name}"), 404, "model_not_found")
    assert error["param"] == "model" and name in error["message"]


def test_tokenize_and_detokenize(scoring: TestClient) -> None:
    response = scoring.post("/tokenize", json={"model": MODEL, "prompt": "ab cde"})
    assert response.json() == {"count": 2, "max_model_len": 64, "tokens": [2, 3]}
    assert scoring.post("/detokenize", json={"model": MODEL, "tokens": [2, 3]}).json() == {"prompt": "xx xxx"}


@pytest.mark.parametrize(
    ("path", "body", "status", "param"),
    [
        ("/detokenize", {"model": MODEL, "tokens": [100]}, 400, "tokens"),
        ("/detokenize", {"model": MODEL, "tokens": [-1]}, 400, "tokens.0"),
        ("/tokenize", {"model": "other", "prompt": "x"}, 404, "model"),
        ("/tokenize", {"model": MODEL}, 400, "prompt"),
    ],
)
def test_tokenizer_routes_refuse_bad_requests(
    scoring: TestClient, path: str, body: dict[str, Any], status: int, param: str
) -> None:
    assert assert_openai_error(scoring.post(path, json=body), status)["param"] == param


def test_a_runtime_without_a_tokenizer_says_so(plain: TestClient) -> None:
    error = assert_openai_error(plain.post("/tokenize", json={"model": MODEL, "prompt": "x"}), 400)
    assert error["code"] == "capability_not_supported"


# --- n > 1 ---------------------------------------------------------------------------------


def test_n_choices_one_after_another() -> None:
    runtime = FakeRuntime()
    with client_for(runtime) as client:
        response = client.post(CHAT, json=chat_body(n=3, seed=7, max_tokens=4))
    assert response.status_code == 200, response.text
    parsed = openai.types.chat.ChatCompletion.model_validate(response.json())
    assert [choice.index for choice in parsed.choices] == [0, 1, 2]
    assert all(choice.message.content == "Paris is the capital" for choice in parsed.choices)
    assert parsed.usage is not None and parsed.usage.completion_tokens == 12
    assert parsed.usage.prompt_tokens == runtime.generations[0].prompt_tokens
    # Each choice samples with its own seed, so seeded choices differ yet are reproducible.
    assert [generation.params.seed for generation in runtime.generations] == [7, 8, 9]
    assert all(generation.closed.is_set() for generation in runtime.generations)


def test_n_choices_streamed(plain: TestClient) -> None:
    _, events = stream(plain, CHAT, chat_body(n=2, stream=True, stream_options={"include_usage": True}))
    texts: dict[int, str] = {}
    roles: list[int] = []
    finished: list[int] = []
    usage = None
    for event in events[:-1]:
        chunk = openai.types.chat.ChatCompletionChunk.model_validate(json.loads(event))
        usage = chunk.usage or usage
        for choice in chunk.choices:
            if choice.delta.role:
                roles.append(choice.index)
            texts[choice.index] = texts.get(choice.index, "") + (choice.delta.content or "")
            if choice.finish_reason:
                finished.append(choice.index)
    assert roles == finished == [0, 1] and texts == {0: REPLY, 1: REPLY}
    assert usage is not None and usage.completion_tokens == 2 * len(REPLY.split())


def test_n_completions_with_echo_and_logprobs(scoring: TestClient) -> None:
    body = scoring.post(COMPLETIONS, json=completion_body(n=2, logprobs=0, max_tokens=3)).json()
    parsed = openai.types.Completion.model_validate(body)
    assert [choice.index for choice in parsed.choices] == [0, 1]
    for choice in parsed.choices:
        assert choice.logprobs is not None and "".join(choice.logprobs.tokens or []) == choice.text
        assert choice.logprobs.text_offset == [0, 5, 8]
    echoed = scoring.post(COMPLETIONS, json=completion_body(n=2, echo=True, max_tokens=1)).json()
    assert [choice["text"] for choice in echoed["choices"]] == ["The capital of France isParis"] * 2


def test_n_completions_streamed_keep_offsets_per_choice(scoring: TestClient) -> None:
    _, events = stream(scoring, COMPLETIONS, completion_body(n=2, stream=True, logprobs=0, max_tokens=3))
    offsets: dict[int, list[int]] = {}
    for event in events[:-1]:
        for choice in json.loads(event)["choices"]:
            if choice["logprobs"]:
                offsets.setdefault(choice["index"], []).extend(choice["logprobs"]["text_offset"])
    assert offsets == {0: [0, 5, 8], 1: [0, 5, 8]}


@pytest.mark.parametrize("n", [0, 9, 2.5])
def test_n_out_of_range_is_refused(plain: TestClient, n: float) -> None:
    assert assert_openai_error(plain.post(CHAT, json=chat_body(n=n)), 400)["param"] == "n"


def test_tokenizer_routes_need_the_api_key_off_loopback() -> None:
    app = create_app(models=ModelTable(ScoringRuntime()), observer=lambda stats: None)
    require_api_key(app, "ef-secret")
    with TestClient(app) as client:
        for path, body in (
            ("/tokenize", {"model": MODEL, "prompt": "a"}),
            ("/detokenize", {"model": MODEL, "tokens": [1]}),
        ):
            assert client.post(path, json=body).status_code == 401
            keyed = client.post(path, json=body, headers={"Authorization": "Bearer ef-secret"})
            assert keyed.status_code == 200
