"""Choosing each next token from an ONNX LM's logits, and turning tokens back into text.

Sampling is numpy over the last logits: greedy at temperature 0, else temperature, top-k,
top-p, frequency/presence penalties and a seed (so a seeded request is reproducible).
Detokenizing decodes each new token with a few before it and emits only the difference, which
keeps SentencePiece's leading spaces and byte-level BPE's split characters right. Both are
per-generation objects the runtime's token loop owns.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from edgefleet.agent.runtimes.base import SamplingParams
from edgefleet.agent.runtimes.prompt import seed32

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

    Logits = npt.NDArray[np.float32]

_DETOKENIZE_CONTEXT = 5  # prompt tokens decoded with the first output token (leading spaces)


class Sampler:
    """Picks the next token from logits as SamplingParams say; seeded, so reproducible."""

    def __init__(self, params: SamplingParams, vocab_size: int) -> None:
        import numpy as np

        self._params = params
        self._vocab_size = vocab_size  # logits beyond the tokenizer's vocabulary are padding
        self._rng = np.random.default_rng(
            seed32(params.seed) if params.seed is not None else secrets.randbits(64)
        )
        self._penalise = params.frequency_penalty != 0 or params.presence_penalty != 0
        self._counts: dict[int, int] = {}

    def choose(self, logits: Logits) -> int:
        import numpy as np

        scores = logits.astype(np.float64)
        scores[self._vocab_size :] = -np.inf
        if self._penalise and self._counts:
            seen = np.fromiter(self._counts, dtype=np.int64)
            counts = np.fromiter(self._counts.values(), dtype=np.float64)
            scores[seen] -= counts * self._params.frequency_penalty + self._params.presence_penalty
        params = self._params
        if params.temperature <= 0:
            token = int(np.argmax(scores))
        else:
            scores = scores / params.temperature
            if 0 < params.top_k < scores.size:
                kth = np.partition(scores, -params.top_k)[-params.top_k]
                scores[scores < kth] = -np.inf
            probs = np.exp(scores - scores.max())
            probs /= probs.sum()
            if params.top_p < 1.0:
                order = np.argsort(-probs, kind="stable")
                before = np.cumsum(probs[order]) - probs[order]  # mass of strictly more likely tokens
                probs[order[before >= params.top_p]] = 0.0
            cumulative = np.cumsum(probs)
            token = int(np.searchsorted(cumulative, self._rng.random() * cumulative[-1], side="right"))
            token = min(token, scores.size - 1)
        if self._penalise:
            self._counts[token] = self._counts.get(token, 0) + 1
        return token


class Detokenizer:
    """Token ids in, text out, correct across tokens: each new token is decoded together with a
    few before it and only the difference is emitted, so SentencePiece's leading spaces and
    byte-level BPE's split characters come out right (a trailing U+FFFD means "wait")."""

    def __init__(self, tokenizer: Any, prompt: Sequence[int]) -> None:
        self._tokenizer = tokenizer
        self._ids = list(prompt[-_DETOKENIZE_CONTEXT:])
        self._read = len(self._ids)  # ids before this were emitted; from _prefix they give context

    def _decode(self, ids: Sequence[int]) -> str:
        return str(self._tokenizer.decode(list(ids), skip_special_tokens=True))

    def feed(self, token: int) -> str:
        self._ids.append(token)
        before = self._decode(self._ids[: self._read])
        text = self._decode(self._ids)
        if len(text) <= len(before) or text.endswith("\ufffd"):
            return ""
        self._ids = self._ids[self._read :]
        self._read = len(self._ids)
        return text[len(before) :]

    def flush(self) -> str:
        before = self._decode(self._ids[: self._read])
        text = self._decode(self._ids)
        return text[len(before) :] if len(text) > len(before) else ""
