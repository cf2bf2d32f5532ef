"""The llama.cpp runtime's side of the OpenAI fields, on real SmolLM2: logprobs equal to the ones
llama-cpp-python's own create_completion reports, logit_bias banning and forcing tokens,
max_tokens beyond the context refused, and the tokenizer behind /tokenize and /detokenize."""

from __future__ import annotations

import math
from collections.abc import Iterator

import pytest

from edgefleet.agent.runtimes.base import (
    CompletionBudgetExceeded,
    FieldNotSupported,
    Runtime,
    SamplingParams,
    TokenizingRuntime,
)
from tests.integration.api_server import loaded_smollm2, smollm2_file

pytestmark = pytest.mark.integration

N_CTX = 256
PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def runtime() -> Iterator[Runtime]:
    with loaded_smollm2(n_ctx=N_CTX, model_id="smollm2") as loaded:
        yield loaded


def test_logprobs_match_llama_cpp_python(runtime: Runtime) -> None:
    """The same greedy tokens and log probabilities as Llama.create_completion(logprobs=3)."""
    import llama_cpp

    ours = runtime.complete(PROMPT, SamplingParams(max_tokens=6, temperature=0.0, logprobs=3))
    reference = llama_cpp.Llama(
        model_path=str(smollm2_file()), n_ctx=N_CTX, n_threads=1, logits_all=True, verbose=False
    )
    try:
        theirs = reference.create_completion(PROMPT, max_tokens=6, temperature=0.0, logprobs=3)
    finally:
        reference.close()
    expected = theirs["choices"][0]["logprobs"]  # type: ignore[index]
    assert ours.logprobs is not None
    assert [record.token.decode() for record in ours.logprobs] == expected["tokens"]
    for record, logprob, top in zip(
        ours.logprobs, expected["token_logprobs"], expected["top_logprobs"], strict=True
    ):
        assert math.isclose(record.logprob, logprob, abs_tol=2e-3)
        assert record.top[0].token == record.token  # greedy: the likeliest token was picked
        alternatives = {candidate.token.decode(): candidate.logprob for candidate in record.top}
        for text, value in top.items():
            if text in alternatives:
                assert math.isclose(alternatives[text], value, abs_tol=2e-3)


def test_streamed_deltas_carry_every_token_once(runtime: Runtime) -> None:
    generation = runtime.complete_stream(PROMPT, SamplingParams(max_tokens=12, temperature=0.0, logprobs=0))
    records, text = [], ""
    for delta in generation:
        assert delta.logprobs is not None
        records += delta.logprobs
        text += delta.text
    generation.close()
    assert len(records) == generation.completion_tokens
    assert b"".join(record.token for record in records).decode() == text
    assert all(record.top == () for record in records)


def test_logit_bias_bans_and_forces(runtime: Runtime) -> None:
    assert isinstance(runtime, TokenizingRuntime)
    (paris,) = runtime.tokenize(" Paris", add_special=False)
    greedy = SamplingParams(max_tokens=2, temperature=0.0)
    assert runtime.complete(PROMPT, greedy).text.startswith(" Paris")
    banned = SamplingParams(max_tokens=2, temperature=0.0, logit_bias=((paris, -100.0),))
    assert not runtime.complete(PROMPT, banned).text.startswith(" Paris")
    forced = SamplingParams(max_tokens=3, temperature=1.0, seed=5, logit_bias=((paris, 100.0),))
    assert runtime.complete("Once upon a time", forced).text == " Paris" * 3


def test_logit_bias_outside_the_vocabulary_is_refused(runtime: Runtime) -> None:
    with pytest.raises(FieldNotSupported) as caught:
        runtime.complete_stream(PROMPT, SamplingParams(logit_bias=((49152, 1.0),)))
    assert caught.value.param == "logit_bias"


def test_max_tokens_beyond_the_context_is_refused(runtime: Runtime) -> None:
    with pytest.raises(CompletionBudgetExceeded) as caught:
        runtime.complete_stream(PROMPT, SamplingParams(max_tokens=N_CTX))
    assert caught.value.n_ctx == N_CTX and caught.value.max_tokens == N_CTX
    assert "context window is 256 tokens" in str(caught.value)
    fits = runtime.complete(
        PROMPT, SamplingParams(max_tokens=N_CTX - caught.value.prompt_tokens, temperature=0)
    )
    assert fits.completion_tokens >= 1


def test_tokenize_round_trip(runtime: Runtime) -> None:
    assert isinstance(runtime, TokenizingRuntime)
    tokens = runtime.tokenize("Hello, world!", add_special=True)
    assert runtime.detokenize(tokens) == "Hello, world!"
    # As a completion prompt counts it.
    assert runtime.complete("Hello, world!", SamplingParams(max_tokens=1)).prompt_tokens == len(tokens)
    marker = runtime.tokenize("<|im_start|>", add_special=False)
    assert len(marker) == 1 and runtime.detokenize(marker) == "<|im_start|>"
    with pytest.raises(FieldNotSupported):
        runtime.detokenize([10**6])
