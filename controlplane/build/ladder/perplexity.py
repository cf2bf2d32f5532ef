"""Perplexity and decode speed of GGUF models, and the windowing every backend shares.

Method (the one llama.cpp's ``llama-perplexity`` tool uses, so numbers are comparable
with what people publish for GGUF quantizations):

1. Tokenize the whole evaluation text once (with BOS when the model's vocabulary adds one).
2. Cut it into consecutive, non-overlapping windows of ``n_ctx`` tokens; a tail shorter than
   a window is dropped. For GGUF the first token of every window is replaced by BOS, as the
   tool does, so each window starts the way the model saw text in training.
3. Evaluate each window from an empty context with logits for every position
   (``logits_all=True``) and score only the second half: the logits at position ``i``
   (``n_ctx // 2 <= i < n_ctx - 1``) against token ``i + 1``. Early positions have almost no
   context and would measure context starvation rather than the weights.
4. Perplexity is ``exp(mean negative log-likelihood)`` over every scored token, computed
   in float64 from the model's float32 logits.

Speed is a fixed short greedy generation: the first ``prompt_tokens`` tokens of the text are
evaluated, then ``gen_tokens`` tokens are decoded one at a time, always taking the argmax
and ignoring end-of-generation, so every variant does exactly the same amount of work.
Only the decode loop is timed (prompt processing excluded). It runs after the perplexity
pass, on the thread that loaded the model: OpenMP builds of llama.cpp keep a worker team
per calling thread, and computing from another thread was measured here at a third of
the speed.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Iterator, Sequence
from importlib.resources import files
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgefleet.controlplane.build.ladder.types import (
    EvalConfig,
    EvaluationError,
    Measurement,
    RuntimeUnavailable,
)

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt
    from llama_cpp import Llama

# Rows of logits turned into log-probabilities at once: bounds float64 temporaries for
# large vocabularies (Gemma 3: 262,144 entries, 2 MiB per row).
_SOFTMAX_ROWS = 32


def default_eval_text() -> str:
    """The evaluation text shipped in the package (public-domain English prose).

    It is the opening chapter of Jane Austen's "Pride and Prejudice" (1813), the first
    paragraph of Charles Dickens's "A Tale of Two Cities" (1859), the opening of Herman
    Melville's "Moby-Dick" (1851) and Abraham Lincoln's Gettysburg Address (1863), all in
    the public domain, following the Project Gutenberg texts in plain ASCII (no italics
    marks, dashes as "--"). Only differences between rows measured with the same text
    matter, so a word that differs from one printed edition does not.
    """
    return (
        files("edgefleet.controlplane.build.ladder").joinpath("data", "eval.txt").read_text(encoding="utf-8")
    )


def default_threads() -> int:
    """Half the logical CPUs (at least one), llama-cpp-python's own default for decoding.

    With hyperthreading that is the physical cores. It also keeps the numbers stable on a
    build machine that is doing other work: OpenMP workers wait for each other at every
    step, so one competing busy process halved Gemma 3 270M's 2-thread decode on 2 cores
    here (49 -> 16-20 tok/s; under heavier load, below 2), while 1 thread stayed at 25-27.
    """
    return max(1, (os.cpu_count() or 2) // 2)


def split_windows(tokens: Sequence[int], *, n_ctx: int, max_windows: int | None) -> list[list[int]]:
    """Consecutive non-overlapping windows of n_ctx tokens; raises if the text fills none."""
    count = len(tokens) // n_ctx
    if count == 0:
        raise EvaluationError(
            f"the evaluation text is {len(tokens)} tokens long, shorter than one window of {n_ctx}; "
            "use a longer text or a smaller n_ctx"
        )
    if max_windows is not None:
        count = min(count, max_windows)
    return [list(tokens[i * n_ctx : (i + 1) * n_ctx]) for i in range(count)]


def window_nll(logits: npt.NDArray[np.floating[Any]], window: Sequence[int]) -> tuple[float, int]:
    """Summed negative log-likelihood of the window's second half, and how many tokens it covers.

    ``logits[i]`` is the model's prediction after seeing ``window[: i + 1]``.
    """
    import numpy as np  # numpy is heavy: only when a model is measured

    n = len(window)
    first = n // 2
    if logits.shape[0] < n - 1:
        raise EvaluationError(f"got logits for {logits.shape[0]} positions, need {n - 1}")
    targets = np.asarray(window[first + 1 : n], dtype=np.int64)
    total = 0.0
    for start in range(first, n - 1, _SOFTMAX_ROWS):
        stop = min(start + _SOFTMAX_ROWS, n - 1)
        rows = np.asarray(logits[start:stop], dtype=np.float64)
        peak = rows.max(axis=1, keepdims=True)
        log_norm = np.log(np.exp(rows - peak).sum(axis=1)) + peak[:, 0]
        picked = rows[np.arange(stop - start), targets[start - first : stop - first]]
        total += float((log_norm - picked).sum())
    return total, n - 1 - first


def perplexity_from(nll_sum: float, count: int) -> float:
    """exp(mean NLL); raises instead of returning a NaN that would slip through the gate."""
    value = math.exp(nll_sum / count) if count else math.nan
    if not math.isfinite(value):
        raise EvaluationError(f"perplexity is not finite (mean NLL {nll_sum / max(count, 1)!r})")
    return value


def measure_gguf(model: Path, *, text: str, config: EvalConfig, n_threads: int | None = None) -> Measurement:
    """Loads `model` with llama-cpp-python and measures it on the calling thread (see module doc)."""
    llama = _load(model, n_ctx=config.n_ctx, n_threads=n_threads or default_threads())
    try:
        tokens = llama.tokenize(text.encode("utf-8"), add_bos=True, special=False)
        windows = split_windows(tokens, n_ctx=config.n_ctx, max_windows=config.max_windows)
        bos = _bos_token(llama)
        nll_sum, count = 0.0, 0
        for window in windows:
            if bos is not None:
                window[0] = bos
            nll, scored = window_nll(_window_logits(llama, window), window)
            nll_sum += nll
            count += scored
        return Measurement(
            perplexity=perplexity_from(nll_sum, count),
            tokens_scored=count,
            windows=len(windows),
            tokens_per_second=_decode_speed(llama, list(tokens[: config.prompt_tokens]), config.gen_tokens),
        )
    finally:
        llama.close()


def _load(model: Path, *, n_ctx: int, n_threads: int) -> Llama:
    try:
        import llama_cpp
    except ImportError as exc:
        raise RuntimeUnavailable("llama-cpp-python is not installed (install edgefleet[agent])") from exc
    try:
        return llama_cpp.Llama(
            model_path=str(model),
            n_ctx=n_ctx,
            n_batch=n_ctx,
            n_threads=n_threads,
            n_threads_batch=n_threads,
            logits_all=True,
            verbose=False,
        )
    except (ValueError, RuntimeError, OSError) as exc:
        raise EvaluationError(f"llama.cpp could not load {model}: {exc}") from exc


def _bos_token(llama: Llama) -> int | None:
    """BOS when the model's vocabulary prepends one (llama.cpp's rule), else None."""
    import llama_cpp

    vocab = llama_cpp.llama_model_get_vocab(llama.model)
    if vocab is None or not llama_cpp.llama_vocab_get_add_bos(vocab):
        return None
    return int(llama.token_bos())


def _window_logits(llama: Llama, window: Sequence[int]) -> npt.NDArray[np.float32]:
    llama.reset()  # type: ignore[no-untyped-call]
    llama.eval(window)
    return llama.scores[: len(window)]


def _decode_speed(llama: Llama, prompt: list[int], gen_tokens: int) -> float:
    llama.reset()  # type: ignore[no-untyped-call]
    llama.eval(prompt)
    started = time.perf_counter()
    for _ in _greedy(llama, gen_tokens):
        pass
    elapsed = time.perf_counter() - started
    return gen_tokens / elapsed if elapsed > 0 else math.inf


def _greedy(llama: Llama, count: int) -> Iterator[int]:
    import numpy as np

    for _ in range(count):
        token = int(np.argmax(llama.scores[llama.n_tokens - 1]))
        llama.eval([token])
        yield token
