"""Embeddings for the llama.cpp runtime: a second context over the generation model's weights.

Why a second context and a small window is explained in agent/runtimes/llama_cpp.py's module
docstring; this is the context itself, built and used on the runtime's llama thread only.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from edgefleet.agent.runtimes.base import GenerationError

if TYPE_CHECKING:
    from llama_cpp import Llama


class LlamaEmbedder:
    """A second llama.cpp context over the generation model's weights, in embedding mode.

    Built on the llama thread and used there only (see the module docstring for why a
    second context and why a small window). Numerics match llama-cpp-python's own
    `Llama(embedding=True).embed(normalize=True)` with the same pooling: flash attention
    is off as the library sets it, and the whole text is one micro-batch (llama.cpp pools
    within a micro-batch, so a text split across two would be pooled wrongly).
    """

    def __init__(self, llama: Llama, *, window: int, pooling: int) -> None:
        import llama_cpp

        params = llama_cpp.llama_context_default_params()
        params.n_ctx = window
        params.n_batch = window
        params.n_ubatch = window
        params.n_seq_max = 1
        params.n_threads = llama.n_threads
        params.n_threads_batch = llama.n_threads_batch
        params.embeddings = True
        params.pooling_type = pooling
        params.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
        params.no_perf = True
        self._lib: Any = llama_cpp
        self._window = window
        self._n_embd = int(llama_cpp.llama_model_n_embd(llama.model))
        self._ctx: Any = llama_cpp.llama_init_from_model(llama.model, params)
        if not self._ctx:
            raise GenerationError("llama.cpp could not create an embedding context (out of memory?)")
        self._batch: Any = llama_cpp.llama_batch_init(window, 0, 1)

    def embed(self, tokens: list[int]) -> tuple[float, ...]:
        lib, batch = self._lib, self._batch
        assert 0 < len(tokens) <= self._window
        batch.n_tokens = len(tokens)
        for position, token in enumerate(tokens):
            batch.token[position] = token
            batch.pos[position] = position
            batch.n_seq_id[position] = 1
            batch.seq_id[position][0] = 0
            batch.logits[position] = True  # pooling reads every token's output
        lib.llama_memory_clear(lib.llama_get_memory(self._ctx), True)
        status = lib.llama_decode(self._ctx, batch)
        if status != 0:
            raise GenerationError(f"llama.cpp failed to embed ({status})")
        pooled = lib.llama_get_embeddings_seq(self._ctx, 0)
        if not pooled:
            raise GenerationError("llama.cpp returned no pooled embedding")
        values: list[float] = pooled[: self._n_embd]
        norm = math.sqrt(math.fsum(value * value for value in values))
        if norm == 0.0:
            return tuple(values)
        return tuple(value / norm for value in values)

    def close(self) -> None:
        self._lib.llama_batch_free(self._batch)
        self._lib.llama_free(self._ctx)
