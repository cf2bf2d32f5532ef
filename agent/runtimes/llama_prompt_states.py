"""The cached prompt of each LoRA adapter, kept aside while another adapter uses the context.

A llama.cpp context has one KV cache, and keys and values computed under one adapter are
wrong under another, so a request for another adapter (or for the base after an adapter)
cannot reuse what the previous request cached. Dropping the cache costs the next request a
whole prompt evaluation, and when requests for two adapters alternate (two conversations,
each growing), every request would pay it. So the cache is saved when another adapter
takes the context (``llama_state_seq_get_data``: the sequence's cells only, no logits) and
put back when its adapter returns; the request then evaluates only what its prompt adds,
as if no other adapter had run between.

Saved caches are bounded in bytes (the least recently saved go first; one larger than the
whole budget is not kept): about 23 KB per token for SmolLM2-135M, so a device keeps a few
hundred tokens per adapter in the default budget. Used on the llama thread only.
"""

from __future__ import annotations

import ctypes
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from llama_cpp import Llama

DEFAULT_MAX_BYTES = 32 * 1024 * 1024

# What a cache was computed under: None for the base, else (adapter serial, scale).
CacheKey = tuple[int, float] | None


@dataclass(frozen=True, slots=True)
class _Saved:
    cells: Any  # ctypes uint8 array: llama.cpp's serialized KV cells of sequence 0
    size: int  # bytes of it in use
    tokens: Any  # numpy array of the evaluated token ids the cells hold, in order


class PromptStates:
    """Saved KV caches by what computed them (see the module docstring)."""

    def __init__(self, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self._max_bytes = max_bytes
        self._saved: OrderedDict[CacheKey, _Saved] = OrderedDict()
        self._bytes = 0

    @property
    def saved_bytes(self) -> int:
        return self._bytes

    def save(self, llama: Llama, key: CacheKey) -> None:
        """Keep the context's cached prompt under ``key`` (the cache itself is left as it is)."""
        import llama_cpp

        count = int(llama.n_tokens)
        if count <= 0 or self._max_bytes <= 0:
            return
        ctx = llama.ctx
        # Cells past the evaluated tokens (a sampled token never evaluated) are not the prompt.
        llama_cpp.llama_memory_seq_rm(llama_cpp.llama_get_memory(ctx), 0, count, -1)
        size = int(llama_cpp.llama_state_seq_get_size(ctx, 0))
        if size <= 0 or size > self._max_bytes:
            return
        cells = (ctypes.c_uint8 * size)()
        written = int(llama_cpp.llama_state_seq_get_data(ctx, cells, size, 0))
        if written <= 0 or written > size:
            return
        self._forget(key)
        while self._saved and self._bytes + written > self._max_bytes:
            self._forget(next(iter(self._saved)))
        self._saved[key] = _Saved(cells=cells, size=written, tokens=llama.input_ids[:count].copy())
        self._bytes += written

    def restore(self, llama: Llama, key: CacheKey) -> bool:
        """Put the prompt saved under ``key`` back into the context; False if none was kept
        (or llama.cpp refused it), and the caller starts from an empty cache."""
        import llama_cpp

        saved = self._saved.get(key)
        if saved is None:
            return False
        self._forget(key)
        read = int(llama_cpp.llama_state_seq_set_data(llama.ctx, saved.cells, saved.size, 0))
        if read != saved.size:
            return False
        count = len(saved.tokens)
        llama.input_ids[:count] = saved.tokens
        llama.n_tokens = count
        # The logits in the context are another prompt's: llama-cpp-python evaluates at least
        # the prompt's last token again before it samples.
        llama._requires_eval = True
        return True

    def drop_adapter(self, serial: int) -> None:
        """Forget caches computed under an adapter that is being freed."""
        for key in [key for key in self._saved if key is not None and key[0] == serial]:
            self._forget(key)

    def clear(self) -> None:
        self._saved.clear()
        self._bytes = 0

    def _forget(self, key: CacheKey) -> None:
        saved = self._saved.pop(key, None)
        if saved is not None:
            self._bytes -= saved.size
