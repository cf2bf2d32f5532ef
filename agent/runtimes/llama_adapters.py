"""LoRA adapters over a llama.cpp runtime's loaded model, applied per generation.

llama.cpp keeps an adapter's weights apart from the model's (``llama_adapter_lora_init``) and
adds their product in the graph of whichever context has it set
(``llama_set_adapters_lora``), so one base serves any number of adapters without being
loaded again, and an adapter costs about its file's size in memory. The base file stays
memory-mapped; only the adapter's tensors are read into their own buffer.

Threads, as for the rest of the runtime (see `edgefleet.agent.runtimes.llama_cpp`): every
llama.cpp call runs on the runtime's llama thread. Loading reads and checks the file on the
caller's thread, then initialises the adapter in one call on the llama thread, between two
tokens of whatever generation is running: the base is never stopped, only delayed by that
call. The name table is shared under a lock, so a request naming an adapter being unloaded
is refused up front; handles, use counts and what the context has set are touched on the
llama thread only.

Per request: a generation sets its adapter (or none) on the context before it decodes
(`begin`), and the KV cache's prompt prefix is reused only when it was computed under the
same adapter and scale, since keys and values computed under one adapter are wrong under
another. The cache of the adapter giving way is set aside and the incoming one's put back,
if it was kept (`llama_prompt_states`); otherwise the request starts from an empty cache.
Scale 0 is the base itself: no adapter is set and the base's cached prefix stays usable.

Unloading removes the name at once; the adapter is freed when no generation uses it, on the
llama thread (cleared from the context first, which must never point at freed weights).
Unloading the runtime frees every adapter before the model (llama.cpp would free them with
the model, but only recent versions do).

Before llama.cpp sees a file, `check_lora_file` reads its header (`gguf_tensors`) and
compares it with the base's: llama.cpp reports a wrong file only as NULL and a log line,
so the reason is found here and raised as a typed `LoraError`.
"""

from __future__ import annotations

import contextlib
import ctypes
import itertools
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgefleet.agent.runtimes.base import GenerationError, LoraRequest, RuntimeUnloaded
from edgefleet.agent.runtimes.gguf_tensors import (
    TYPE_NAMES,
    GgufFormatError,
    GgufLayout,
    TensorInfo,
    read_layout,
)
from edgefleet.agent.runtimes.llama_prompt_states import DEFAULT_MAX_BYTES, CacheKey, PromptStates
from edgefleet.agent.runtimes.lora import (
    LoraFileInvalid,
    LoraInfo,
    LoraLoadFailed,
    LoraMismatch,
    LoraNameRefused,
    TooManyLoras,
    UnknownLora,
    check_name,
)
from edgefleet.agent.runtimes.slot_generation import OwnThread

if TYPE_CHECKING:
    from llama_cpp import Llama

DEFAULT_MAX_LORAS = 8
_SUFFIXES = (".lora_a", ".lora_b")


def check_lora_file(path: Path, base: GgufLayout, *, name: str, max_bytes: int) -> LoraInfo:
    """What llama.cpp's adapter loader checks, with the reason as a typed error.

    Raises LoraFileInvalid (not a LoRA GGUF, truncated, unpaired, too large) or LoraMismatch
    (another architecture, a tensor the base lacks, a shape that does not fit)."""
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise LoraFileInvalid(f"cannot read LoRA adapter {path}: {exc.strerror or exc}") from exc
    if size > max_bytes:
        raise LoraFileInvalid(f"LoRA adapter {path} has {size} bytes, more than the limit of {max_bytes}")
    try:
        layout = read_layout(path)
    except (GgufFormatError, OSError) as exc:
        raise LoraFileInvalid(f"{path} is not a GGUF file: {exc}") from exc
    kind, adapter = layout.string("general.type"), layout.string("adapter.type")
    if kind != "adapter" or adapter != "lora":
        raise LoraFileInvalid(
            f"{path} is not a LoRA adapter (general.type {kind!r}, adapter.type {adapter!r}; "
            "expected 'adapter' and 'lora')"
        )
    arch, base_arch = layout.string("general.architecture"), base.string("general.architecture")
    if arch != base_arch:
        raise LoraMismatch(f"LoRA adapter {path} is for architecture {arch!r}, the model is {base_arch!r}")
    pairs = _pairs(path, layout)
    rank = 0
    for target, (a, b) in sorted(pairs.items()):
        weight = base.tensors.get(target)
        if weight is None:
            raise LoraMismatch(
                f"LoRA adapter {path} patches {target!r}, which the model lacks", tensor=target
            )
        rank = max(rank, _check_shapes(path, target, weight, a, b))
        for tensor in (a, b):
            _check_data(path, layout, tensor)
    alpha = layout.number("adapter.lora.alpha") or 0.0
    return LoraInfo(
        name=name,
        path=path,
        size_bytes=size,
        rank=rank,
        alpha=alpha,
        tensors=len(pairs),
        architecture=arch or "",
    )


def _pairs(path: Path, layout: GgufLayout) -> dict[str, tuple[TensorInfo, TensorInfo]]:
    """The A and B tensors of each patched weight; norm tensors are skipped, as llama.cpp does."""
    halves: dict[str, dict[str, TensorInfo]] = {}
    for name, tensor in layout.tensors.items():
        suffix = next((s for s in _SUFFIXES if name.endswith(s)), None)
        if suffix is None:
            if name.endswith("_norm.weight"):
                continue
            raise LoraFileInvalid(
                f"LoRA adapter {path} holds {name!r}, neither a .lora_a nor a .lora_b tensor"
            )
        halves.setdefault(name.removesuffix(suffix), {})[suffix] = tensor
    pairs: dict[str, tuple[TensorInfo, TensorInfo]] = {}
    for target, half in halves.items():
        if len(half) != len(_SUFFIXES):
            raise LoraFileInvalid(f"LoRA adapter {path} has only one of {target!r}'s two tensors")
        pairs[target] = (half[".lora_a"], half[".lora_b"])
    if not pairs:
        raise LoraFileInvalid(f"LoRA adapter {path} holds no LoRA tensors")
    return pairs


def _check_shapes(path: Path, target: str, weight: TensorInfo, a: TensorInfo, b: TensorInfo) -> int:
    """The pair's rank, after llama.cpp's own shape rules (ggml order: ne[0] is the input size)."""
    w, sa, sb = weight.shape, (*a.shape, 1), (*b.shape, 1)
    if len(w) < 2:
        raise LoraMismatch(f"LoRA adapter {path} patches {target!r}, which is not a matrix", tensor=target)
    if target.endswith("token_embd.weight"):  # stored flipped: B is not transposed (llm_build_inp_embd)
        fits, rank = w[0] == sb[1] and w[1] == sa[1], sa[0]
    else:
        fits, rank = w[0] == sa[0] and w[1] == sb[1] and sa[1] == sb[0], sa[1]
    if not fits:
        raise LoraMismatch(
            f"LoRA adapter {path} does not fit {target!r}: the weight is {list(w)}, lora_a is "
            f"{list(a.shape)} and lora_b is {list(b.shape)} (ggml order)",
            tensor=target,
        )
    return rank


def _check_data(path: Path, layout: GgufLayout, tensor: TensorInfo) -> None:
    nbytes = tensor.nbytes()
    if nbytes is None:
        names = ", ".join(TYPE_NAMES.values())
        raise LoraFileInvalid(
            f"LoRA tensor {tensor.name!r} in {path} has ggml type {tensor.ggml_type} (supported: {names})"
        )
    if layout.data_start + tensor.offset + nbytes > layout.file_size:
        raise LoraFileInvalid(f"LoRA adapter {path} is truncated: {tensor.name!r} ends past the file's end")


@dataclass(eq=False)
class _Adapter:
    info: LoraInfo
    handle: Any  # llama_adapter_lora_p
    serial: int  # never reused: what the KV cache was computed under is told apart by it
    users: int = 0  # generations using it (llama thread)
    retired: bool = False  # unloaded; freed when `users` drops to 0 (llama thread)


@dataclass(frozen=True, slots=True)
class LoraUse:
    """One generation's hold on its adapter (or on none); `end` exactly once, on the llama thread."""

    owner: LlamaLoras
    adapter: _Adapter | None = None

    def end(self) -> None:
        if self.adapter is not None:
            self.owner._end(self.adapter)


class LlamaLoras:
    """The adapters over one runtime's model (see the module docstring for the threading rules)."""

    def __init__(
        self,
        *,
        thread: OwnThread,  # the runtime's llama thread
        loaded: Callable[[], Llama],  # the runtime's model; raises RuntimeUnloaded once it is gone
        base_path: Path,
        max_loras: int = DEFAULT_MAX_LORAS,
        max_bytes: int | None = None,  # default: the base file's size (no low-rank delta is larger)
        max_prompt_bytes: int = DEFAULT_MAX_BYTES,  # for the caches of adapters not in use
    ) -> None:
        self._thread = thread
        self._loaded = loaded
        self._base_path = base_path
        self._max_loras = max_loras
        self._max_bytes = max_bytes
        self._lock = threading.Lock()  # guards the three below
        self._by_name: dict[str, _Adapter] = {}
        self._pending: set[str] = set()  # names being loaded
        self._base: GgufLayout | None = None
        self._serials = itertools.count(1)
        # Llama thread only:
        self._live: list[_Adapter] = []  # initialised and not yet freed (retired ones included)
        self._on_context: tuple[int, float] | None = None  # (serial, scale) set on the context
        self._cache_under: CacheKey = None  # what computed the KV cache's tokens
        self._prompts = PromptStates(max_prompt_bytes)  # other adapters' caches, set aside

    def infos(self) -> tuple[LoraInfo, ...]:
        with self._lock:
            return tuple(self._by_name[name].info for name in sorted(self._by_name))

    def require(self, request: LoraRequest | None) -> None:
        """Refuse a request naming an adapter not loaded (before it queues for the model)."""
        if request is not None:
            with self._lock:
                if request.name not in self._by_name:
                    raise UnknownLora(request.name, sorted(self._by_name))

    def load(self, name: str, path: Path) -> LoraInfo:
        check_name(name)
        with self._lock:
            if name in self._by_name or name in self._pending:
                raise LoraNameRefused(f"a LoRA adapter named `{name}` is already loaded; unload it first")
            if len(self._by_name) + len(self._pending) >= self._max_loras:
                raise TooManyLoras(self._max_loras)
            self._pending.add(name)
        try:
            base = self._base_layout()
            limit = self._max_bytes if self._max_bytes is not None else base.file_size
            info = check_lora_file(path, base, name=name, max_bytes=limit)
            return self._thread.call(lambda: self._init(info))
        finally:
            with self._lock:
                self._pending.discard(name)

    def unload(self, name: str) -> None:
        with self._lock:
            adapter = self._by_name.pop(name, None)
            if adapter is None:
                raise UnknownLora(name, sorted(self._by_name))
        # RuntimeUnloaded: the runtime was unloaded meanwhile, and freed it with the rest.
        with contextlib.suppress(RuntimeUnloaded):
            self._thread.call(lambda: self._retire(adapter))

    def begin(self, llama: Llama, request: LoraRequest | None) -> LoraUse:
        """On the llama thread, before a generation decodes: set its adapter on the context and
        drop the KV cache if it was computed under another. Raises UnknownLora."""
        adapter = None
        if request is not None:
            with self._lock:
                adapter = self._by_name.get(request.name)
                if adapter is None:
                    raise UnknownLora(request.name, sorted(self._by_name))
            if request.scale == 0.0:
                adapter = None  # the base alone: no work for a zero delta, and its cache stays good
        key = None if adapter is None or request is None else (adapter.serial, request.scale)
        if key != self._on_context:
            self._set_context(llama, adapter, 0.0 if request is None else request.scale)
            self._on_context = key
        if key != self._cache_under:
            self._prompts.save(llama, self._cache_under)
            if not self._prompts.restore(llama, key):
                llama.reset()  # type: ignore[no-untyped-call]  # the next eval drops every cached token
            self._cache_under = key
        if adapter is not None:
            adapter.users += 1
        return LoraUse(self, adapter)

    def close(self, llama: Llama) -> None:
        """On the llama thread, before the model is freed: free every adapter."""
        with self._lock:
            self._by_name.clear()
        self._set_context(llama, None, 0.0)
        self._on_context = None
        self._prompts.clear()
        import llama_cpp

        for adapter in self._live:
            llama_cpp.llama_adapter_lora_free(adapter.handle)
        self._live.clear()

    def _base_layout(self) -> GgufLayout:
        """The model file's tensor table, read once (on the first load's thread)."""
        with self._lock:
            base = self._base
        if base is None:
            try:
                base = read_layout(self._base_path)
            except (GgufFormatError, OSError) as exc:
                raise LoraLoadFailed(f"cannot read the model's tensor table: {exc}") from exc
            with self._lock:
                self._base = base
        return base

    # --- llama thread ---------------------------------------------------------------------

    def _init(self, info: LoraInfo) -> LoraInfo:
        import llama_cpp

        llama = self._loaded()
        handle = llama_cpp.llama_adapter_lora_init(llama.model, str(info.path).encode())
        if not handle:
            raise LoraLoadFailed(f"llama.cpp could not load LoRA adapter {info.path} (out of memory?)")
        adapter = _Adapter(info=info, handle=handle, serial=next(self._serials))
        self._live.append(adapter)
        with self._lock:
            self._by_name[info.name] = adapter
        return info

    def _set_context(self, llama: Llama, adapter: _Adapter | None, scale: float) -> None:
        import llama_cpp

        if adapter is None:
            status = llama_cpp.llama_set_adapters_lora(llama.ctx, None, 0, None)
        else:
            handles = (llama_cpp.llama_adapter_lora_p_ctypes * 1)(adapter.handle)
            scales = (ctypes.c_float * 1)(scale)
            status = llama_cpp.llama_set_adapters_lora(llama.ctx, handles, 1, scales)
        if status != 0:
            raise GenerationError(f"llama.cpp could not set LoRA adapters on its context ({status})")

    def _end(self, adapter: _Adapter) -> None:
        adapter.users -= 1
        if adapter.retired and adapter.users == 0:
            self._free(adapter)

    def _retire(self, adapter: _Adapter) -> None:
        adapter.retired = True
        if adapter.users == 0:
            self._free(adapter)

    def _free(self, adapter: _Adapter) -> None:
        if adapter not in self._live:
            return  # freed with the model already
        if self._on_context is not None and self._on_context[0] == adapter.serial:
            self._set_context(self._loaded(), None, 0.0)
            self._on_context = None
        import llama_cpp

        llama_cpp.llama_adapter_lora_free(adapter.handle)
        self._live.remove(adapter)
        self._prompts.drop_adapter(adapter.serial)
