"""Constrained decoding for runtimes whose tokenizer is a Hugging Face ``tokenizers`` one (ONNX
Runtime, MLX): the grammar engine's token mask as an additive logits mask.

The grammar engine is the one llama.cpp uses (llguidance, see runtimes.constraints); only its
tokenizer is built differently, from the ``tokenizers`` JSON (what ``llguidance.hf`` does for a
transformers tokenizer). Each step the mask is computed once, into a reused bit buffer, and
turned into a float32 row of 0 (allowed) and -inf (forbidden) that the runtime adds to its
logits before sampling, so temperature, top-k/top-p and penalties only ever see allowed tokens.
Logits past the engine's vocabulary (padding rows of the output layer) are always forbidden.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from typing import Any

import numpy as np
import numpy.typing as npt

from edgefleet.agent.runtimes.base import Constraint, ConstraintError

Mask = npt.NDArray[np.float32]


def _llguidance() -> Any:
    try:
        import llguidance
    except ImportError as exc:  # pragma: no cover - part of the agent extra
        raise ConstraintError("constrained decoding needs llguidance (install edgefleet[agent])") from exc
    return llguidance


class TokenizersGuidance:
    """llguidance's tokenizer for one ``tokenizers.Tokenizer``, built on first use (about a
    second for a 49k vocabulary) and kept with the runtime; safe to start from any thread."""

    def __init__(self, tokenizer: Any, *, vocab_size: int, end_tokens: Iterable[int]) -> None:
        self._tokenizer = tokenizer
        self._vocab_size = vocab_size
        self._end_tokens = sorted({int(token) for token in end_tokens if 0 <= token < vocab_size})
        self._engine: Any = None
        self._lock = threading.Lock()

    def _engine_tokenizer(self) -> Any:
        with self._lock:
            if self._engine is None:
                if not self._end_tokens:
                    raise ConstraintError("the model names no end-of-sequence token to end a grammar with")
                llguidance = _llguidance()
                try:
                    self._engine = llguidance.LLTokenizer(
                        self._tokenizer.to_str(), n_vocab=self._vocab_size, eos_token=self._end_tokens
                    )
                except ValueError as exc:
                    raise ConstraintError(f"the grammar engine cannot read this tokenizer: {exc}") from exc
            return self._engine

    def start(self, constraint: Constraint) -> GrammarMask:
        """A matcher at the grammar's start; raises ConstraintError if it does not compile."""
        llguidance = _llguidance()
        engine = self._engine_tokenizer()
        matcher = llguidance.LLMatcher(engine, constraint.grammar, log_level=0)
        if matcher.is_error():
            raise ConstraintError(f"the constraint cannot be compiled: {matcher.get_error()}")
        return GrammarMask(matcher, vocab_size=int(engine.vocab_size))


class GrammarMask:
    """One generation's grammar state: the additive mask for the next token, and the tokens
    sampled so far followed (``consumed`` counts them)."""

    def __init__(self, matcher: Any, *, vocab_size: int) -> None:
        self._matcher = matcher
        self._vocab_size = vocab_size
        self._bits = np.zeros((vocab_size + 31) // 32, dtype=np.int32)
        self._pointer = int(self._bits.ctypes.data)
        self._nbytes = int(self._bits.nbytes)
        self.consumed = 0

    def additive(self, width: int) -> Mask:
        """A row of ``width`` float32: 0 where the grammar allows the next token, else -inf."""
        self._matcher.unsafe_compute_mask_ptr(self._pointer, self._nbytes)
        if self._matcher.is_error():
            raise ConstraintError(f"the constraint failed: {self._matcher.get_error()}")
        size = min(width, self._vocab_size)
        allowed = np.unpackbits(self._bits.view(np.uint8), count=size, bitorder="little").view(bool)
        mask = np.full(width, -np.inf, dtype=np.float32)
        mask[:size][allowed] = 0.0
        return mask

    def advance(self, token: int) -> bool:
        """Follow the sampled token; True once the grammar is complete (only an end may follow)."""
        if not self._matcher.consume_token(int(token)):
            raise ConstraintError(f"the constraint failed: {self._matcher.get_error()}")
        self.consumed += 1
        return self.stopped

    def follow(self, index: int, token: int) -> bool:
        """Follow the ``index``-th generated token unless it was followed already (a runtime that
        computes the next step's mask before handing the token out has); True once complete."""
        if index == self.consumed:
            self.advance(token)
        return self.stopped

    @property
    def stopped(self) -> bool:
        return bool(self._matcher.is_stopped())
