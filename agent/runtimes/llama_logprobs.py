"""Per-token log probabilities and logit biases for the llama.cpp runtime.

Log probabilities: llama-cpp-python's ``generate()`` samples inside llama.cpp and keeps no
logits unless the context is built with ``logits_all`` (a vocabulary-wide row for every
prompt token, ~0.2 MB each for SmolLM2's 49k vocabulary, paid by every request). Without
it the context still holds the logits row of the last position it decoded, the one the
sampler just picked from, until the next token is decoded. `TokenScores.record` reads that
row right after ``generate()`` yields a token: the log-softmax of the raw logits, which is
what OpenAI and vLLM report (the model's distribution, before logit_bias, penalties,
top-k/top-p and temperature).

Logit bias: ``generate()``'s one hook into sampling is a logits processor, which
llama-cpp-python runs as a custom sampler at the head of the chain, over every token in id
order, before penalties and truncation (as ``Llama.create_completion`` does with its own
``logit_bias``). `TokenScores.processors` returns one that adds the request's biases.

`detokenize` is POST /detokenize's llama.cpp side: token ids checked against the vocabulary
first, since llama.cpp does not check them.

Everything here runs on the runtime's llama thread.
"""

from __future__ import annotations

import ctypes
import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from edgefleet.agent.runtimes.base import FieldNotSupported, SamplingParams, TokenLogprob, TopLogprob

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt
    from llama_cpp import Llama

MAX_TOP_LOGPROBS = 20  # OpenAI's limit for chat top_logprobs (completions allow 5)


class TokenScores:
    """One generation's logprob recorder and logit-bias processor."""

    def __init__(self, params: SamplingParams, llama: Llama) -> None:
        import numpy as np

        self._top = None if params.logprobs is None else min(params.logprobs, MAX_TOP_LOGPROBS)
        self._llama = llama
        self._n_vocab = int(llama.n_vocab())
        self._bias_ids = np.array([token for token, _ in params.logit_bias], dtype=np.intc)
        self._bias_values = np.array([bias for _, bias in params.logit_bias], dtype=np.single)

    @property
    def wanted(self) -> bool:
        return self._top is not None

    def processors(self) -> list[Callable[[Any, Any], Any]] | None:
        """The logits processors ``generate()`` needs (None when there is no bias to apply)."""
        if not self._bias_ids.size:
            return None
        return [self._bias]

    def _bias(self, input_ids: Any, scores: npt.NDArray[np.single]) -> npt.NDArray[np.single]:
        scores[self._bias_ids] += self._bias_values
        return scores

    def record(self, token: int) -> TokenLogprob | None:
        """The picked token's logprob and top candidates, from the logits it was sampled from."""
        if self._top is None:
            return None
        import llama_cpp
        import numpy as np

        pointer = llama_cpp.llama_get_logits_ith(self._llama.ctx, -1)
        row = np.ctypeslib.as_array(
            ctypes.cast(pointer, ctypes.POINTER(ctypes.c_float)), shape=(self._n_vocab,)
        )  # a view of llama.cpp's buffer: read here, before the next token is decoded
        # log p(i) = logit(i) - logsumexp(logits); only the values reported are computed, in
        # float32 with a float64 sum (a float64 copy of the row took ~6x as long per token).
        peak = float(row.max())
        normaliser = peak + math.log(float(np.exp(row - peak).sum(dtype=np.float64)))
        top: tuple[TopLogprob, ...] = ()
        if self._top > 0:
            best = np.argpartition(row, -self._top)[-self._top :]
            best = best[np.argsort(-row[best], kind="stable")]
            top = tuple(TopLogprob(self._text(int(i)), float(row[i]) - normaliser) for i in best)
        return TokenLogprob(token=self._text(token), logprob=float(row[token]) - normaliser, top=top)

    def _text(self, token: int) -> bytes:
        return bytes(self._llama.detokenize([token], special=True))


def detokenize(llama: Llama, tokens: Sequence[int], vocab_size: int | None) -> str:
    """The text of ``tokens``; an id outside the vocabulary is refused, naming it."""
    limit = vocab_size if vocab_size is not None else int(llama.n_vocab())
    for index, token in enumerate(tokens):
        if not 0 <= token < limit:
            raise FieldNotSupported(
                "tokens", f"tokens[{index}] = {token} is not a token id of this model (0..{limit - 1})"
            )
    return bytes(llama.detokenize(list(tokens), special=True)).decode("utf-8", errors="replace")


class PendingLogprobs:
    """Token records waiting for the delta that carries their text (the stop-sequence buffer
    may hold a token's text back): each delta takes what has accumulated."""

    def __init__(self, wanted: bool) -> None:
        self._wanted = wanted
        self._records: list[TokenLogprob] = []

    def add(self, record: TokenLogprob | None) -> None:
        if record is not None:
            self._records.append(record)

    def take(self) -> tuple[TokenLogprob, ...] | None:
        """For the next delta: None when logprobs were not asked for."""
        if not self._wanted:
            return None
        records, self._records = tuple(self._records), []
        return records
