"""OpenAI's two shapes for token log probabilities, built from the runtimes' TokenLogprob records.

Chat completions (``logprobs: true``, ``top_logprobs: k``): ``choice.logprobs.content`` is one
entry per generated token with its text, UTF-8 ``bytes``, ``logprob`` and the ``top_logprobs``
candidates. Completions (``logprobs: k``): ``choice.logprobs`` holds parallel lists
``tokens``, ``token_logprobs``, ``top_logprobs`` (one {text: logprob} map per token) and
``text_offset`` (where each token starts in the choice's text, after the echoed prompt).
Streamed, each chunk carries the entries of the tokens whose text it brings (or that the
stop-sequence buffer released with it), so the chunks together give the whole list.
A logprob is the model's, before logit_bias, penalties and truncation; a probability that
underflows is reported as -9999.0, as OpenAI does, since JSON has no -Infinity.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from edgefleet.agent.api.protocol import OpenAIBaseModel
from edgefleet.agent.runtimes.base import TokenLogprob

FLOOR = -9999.0


def _finite(value: float) -> float:
    return value if math.isfinite(value) and value > FLOOR else FLOOR


def _text(token: bytes) -> str:
    return token.decode("utf-8", errors="replace")


class TopLogprob(OpenAIBaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class ChatTokenLogprob(OpenAIBaseModel):
    token: str
    logprob: float
    bytes: list[int] | None
    top_logprobs: list[TopLogprob]


class ChatChoiceLogprobs(OpenAIBaseModel):
    content: list[ChatTokenLogprob] | None
    refusal: list[ChatTokenLogprob] | None = None


class CompletionLogprobs(OpenAIBaseModel):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float]] | None
    text_offset: list[int]


def chat_logprobs(records: Sequence[TokenLogprob] | None) -> ChatChoiceLogprobs | None:
    """None when logprobs were not asked for (the runtime then reports none)."""
    if records is None:
        return None
    return ChatChoiceLogprobs(
        content=[
            ChatTokenLogprob(
                token=_text(record.token),
                logprob=_finite(record.logprob),
                bytes=list(record.token),
                top_logprobs=[
                    TopLogprob(token=_text(top.token), logprob=_finite(top.logprob), bytes=list(top.token))
                    for top in record.top
                ],
            )
            for record in records
        ]
    )


class CompletionOffsets:
    """Builds completion logprobs chunk by chunk, keeping ``text_offset`` running across them."""

    def __init__(self, start: int) -> None:
        self.offset = start  # characters of the choice's text before the next token

    def build(self, records: Sequence[TokenLogprob]) -> CompletionLogprobs:
        tokens: list[str] = []
        offsets: list[int] = []
        for record in records:
            text = _text(record.token)
            tokens.append(text)
            offsets.append(self.offset)
            self.offset += len(text)
        return CompletionLogprobs(
            tokens=tokens,
            token_logprobs=[_finite(record.logprob) for record in records],
            top_logprobs=[
                {_text(top.token): _finite(top.logprob) for top in record.top} for record in records
            ],
            text_offset=offsets,
        )
