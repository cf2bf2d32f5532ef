"""ONNX models through ONNX Runtime: decoder-only LMs (chat, completions) and sentence encoders.

A variant arrives as a folder (the updater unpacks the signed tar): ``model.onnx`` (or the
one ``.onnx`` file in it, or in its ``onnx/`` subfolder, with any external-data files beside
it), ``tokenizer.json`` for the Hugging Face ``tokenizers`` library, and optionally
``config.json``, ``generation_config.json``, ``tokenizer_config.json`` and
``chat_template.jinja``. An ONNX graph carries no tokenizer, no chat template and no context
length, which is why the folder, not the graph, is the unit a device loads.

What the model is comes from the graph: a ``logits`` output makes a causal LM, a
``last_hidden_state`` / ``token_embeddings`` / ``sentence_embedding`` output an encoder.

- LMs run a token loop owned here, as the llama.cpp adapter does, so prompt length is
  checked before any work, tokens are counted as produced, stop sequences and split UTF-8
  characters are held back (:class:`edgefleet.agent.runtimes.text.StopTextBuffer`), and closing a
  stream stops the model within one token. Graphs exported with a KV cache in Hugging Face
  Optimum's layout (``past_key_values.N.key/value`` inputs [batch, heads, past, head_dim],
  ``present.N.key/value`` outputs, optionally ``use_cache_branch``) get the prompt once and
  then one token per step; graphs without cache inputs rerun the whole sequence every step,
  which is correct but quadratic. Sampling is numpy over the last logits: greedy at
  temperature 0, else temperature, top-k, top-p, frequency/presence penalties, and a seed.
- Encoders give one vector per text: mean of the token vectors over the attention mask,
  then L2-normalised, as sentence-transformers does for its MiniLM / MPNet models (a graph
  that already outputs ``sentence_embedding`` is only normalised). A text longer than the
  model's positions raises ContextLengthExceeded rather than being truncated silently.

The context window is the smallest of the requested ``n_ctx`` and what the folder says
the model has (config.json's ``max_position_embeddings`` or its aliases, else
tokenizer_config.json's ``model_max_length``, else tokenizer.json's truncation length):
positions beyond a learned position table make ONNX Runtime fail mid-request.

Execution provider: the first available of :data:`PROVIDER_PREFERENCE`, with CPU behind it
for the operators the accelerator lacks; ``describe().device`` is the provider ONNX
Runtime actually put first (it drops a provider that fails to initialise).

Threads: ``InferenceSession.run`` is thread-safe, but a generation keeps its KV cache
between tokens and two concurrent runs would fight over the same intra-op threads, so one
"slot" lock keeps generations and embedding batches one at a time; ``unload()`` takes it
too, so the session is never released under a running request. No dedicated thread is
needed: ONNX Runtime's thread pool is its own, not tied to the calling thread.

``onnxruntime``, ``tokenizers``, ``numpy`` and (for chat templates) ``jinja2`` are
imported in ``load()`` only.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import threading
from collections.abc import Callable, Generator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from edgefleet.agent.runtimes.base import (
    GENERATIVE,
    Capability,
    CapabilityNotSupported,
    ChatMessage,
    ChatNotSupported,
    Completion,
    ContextLengthExceeded,
    Delta,
    Embeddings,
    FinishReason,
    GenerationError,
    InvalidPromptError,
    RuntimeDescription,
    RuntimeFailure,
    RuntimeLoadError,
    RuntimeSmokeTestError,
    RuntimeUnloaded,
    SamplingParams,
    collect,
    smoke_generate,
)
from edgefleet.agent.runtimes.hf_tokens import TokenizersPieces
from edgefleet.agent.runtimes.prompt import PromptLimit, assemble, chat_segments, seed32
from edgefleet.agent.runtimes.slot_generation import InlineCalls, SlotGeneration, start_generation
from edgefleet.agent.runtimes.text import StopTextBuffer
from edgefleet.protos.fleet.v1 import common_pb2

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

    Logits = npt.NDArray[np.float32]

log = logging.getLogger(__name__)

RUNTIME_NAME = "onnxruntime"
CPU_PROVIDER = "CPUExecutionProvider"
PROVIDER_PREFERENCE: Final[tuple[str, ...]] = (
    "TensorrtExecutionProvider",
    "CUDAExecutionProvider",
    "MIGraphXExecutionProvider",
    "ROCMExecutionProvider",
    "QNNExecutionProvider",
    "VitisAIExecutionProvider",
    "CoreMLExecutionProvider",
    "OpenVINOExecutionProvider",
    "DmlExecutionProvider",
    CPU_PROVIDER,
)
"""Fastest first: discrete GPUs, then NPUs, then providers that pick a device themselves.
The same order as ``edgefleet.agent.update.selection.ONNX_PROVIDERS``, so the runtime lands where variant
selection planned it. Providers not listed (e.g. Azure's remote one) are never chosen."""

MODEL_FILE = "model.onnx"
TOKENIZER_FILE = "tokenizer.json"
CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx")
ENCODER_TOKEN_OUTPUTS = ("last_hidden_state", "token_embeddings")
SENTENCE_OUTPUT = "sentence_embedding"
EMBED_BATCH = 16  # texts per session run: padding waste stays small, throughput stays good

_UNBOUNDED_MODEL_MAX_LENGTH = 10**7  # transformers writes 1e30 when it does not know
_DETOKENIZE_CONTEXT = 5  # prompt tokens decoded with the first output token (leading spaces)
_NUMPY_FLOATS: Mapping[str, str] = {"tensor(float)": "float32", "tensor(float16)": "float16"}
_NUMPY_INTS: Mapping[str, str] = {"tensor(int64)": "int64", "tensor(int32)": "int32"}


# --- choosing where to run ------------------------------------------------------------------


def choose_providers(available: Sequence[str]) -> tuple[str, ...]:
    """The best available accelerator (if any) followed by CPU, in PROVIDER_PREFERENCE order.

    One accelerator only: ONNX Runtime assigns each node to the first provider that can run
    it, so listing a second accelerator would split a graph across devices.
    """
    accelerators = [p for p in PROVIDER_PREFERENCE if p != CPU_PROVIDER and p in available]
    return (*accelerators[:1], CPU_PROVIDER)


def find_model_file(folder: Path) -> Path:
    """``model.onnx``, else the only ``.onnx`` file, in the folder or its ``onnx/`` subfolder."""
    for directory in (folder, folder / "onnx"):
        if (directory / MODEL_FILE).is_file():
            return directory / MODEL_FILE
        candidates = sorted(p for p in directory.glob("*.onnx") if p.is_file())
        if len(candidates) == 1:
            return candidates[0]
        if len(candidates) > 1:
            names = ", ".join(p.name for p in candidates)
            raise RuntimeLoadError(
                f"{directory} holds several ONNX models ({names}); name the one to serve {MODEL_FILE}"
            )
    raise RuntimeLoadError(f"no ONNX model in {folder} (expected {MODEL_FILE})")


# --- the folder's Hugging Face files --------------------------------------------------------


def _read_json(path: Path) -> dict[str, Any]:
    """A JSON object file, or {} when absent; a present but unreadable file is a load error."""
    if not path.is_file():
        return {}
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise RuntimeLoadError(f"{path.name} is not readable JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise RuntimeLoadError(f"{path.name} is not a JSON object")
    return value


def _token_text(value: object) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or {"content": ...}."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return str(value["content"])
    return None


def _ids(value: object) -> set[int]:
    if isinstance(value, bool):
        return set()
    if isinstance(value, int):
        return {value}
    if isinstance(value, list):
        return {v for v in value if isinstance(v, int) and not isinstance(v, bool)}
    return set()


@dataclass(frozen=True, slots=True)
class FolderConfig:
    """What the model folder says beyond the graph: context, special tokens, chat template."""

    max_positions: int | None
    eos_ids: frozenset[int]
    bos_id: int | None
    special_tokens: Mapping[str, str]  # bos_token, eos_token, ... for the chat template
    chat_template: str | None
    config: Mapping[str, Any] = field(default_factory=dict)


def read_folder_config(folder: Path, tokenizer: Any, truncation: int | None) -> FolderConfig:
    """Reads config.json, generation_config.json, tokenizer_config.json and chat_template.jinja."""
    config = _read_json(folder / "config.json")
    generation = _read_json(folder / "generation_config.json")
    tokenizer_config = _read_json(folder / "tokenizer_config.json")

    max_positions = next(
        (
            v
            for k in CONTEXT_KEYS
            if isinstance(v := config.get(k), int) and not isinstance(v, bool) and v > 0
        ),
        None,
    )
    model_max = tokenizer_config.get("model_max_length")
    if max_positions is None and isinstance(model_max, int) and 0 < model_max < _UNBOUNDED_MODEL_MAX_LENGTH:
        max_positions = model_max
    if max_positions is None:
        max_positions = truncation

    special: dict[str, str] = {}
    for key, value in tokenizer_config.items():
        if key.endswith("_token") and (text := _token_text(value)) is not None:
            special[key] = text

    def token_id(name: str) -> int | None:
        text = special.get(name)
        found = tokenizer.token_to_id(text) if text else None
        return int(found) if found is not None else None

    eos = _ids(config.get("eos_token_id")) | _ids(generation.get("eos_token_id"))
    if (eos_id := token_id("eos_token")) is not None:
        eos.add(eos_id)
    bos_ids = _ids(config.get("bos_token_id")) or ({b} if (b := token_id("bos_token")) is not None else set())

    template: str | None = None
    template_file = folder / "chat_template.jinja"
    if template_file.is_file():
        template = template_file.read_text(encoding="utf-8")
    else:
        raw = tokenizer_config.get("chat_template")
        if isinstance(raw, list):  # named templates: transformers uses "default"
            named = {t.get("name"): t.get("template") for t in raw if isinstance(t, dict)}
            raw = named.get("default")
        template = raw if isinstance(raw, str) and raw.strip() else None
    return FolderConfig(
        max_positions=max_positions,
        eos_ids=frozenset(eos),
        bos_id=min(bos_ids) if bos_ids else None,
        special_tokens=special,
        chat_template=template,
        config=config,
    )


def compile_chat_template(
    template: str, special_tokens: Mapping[str, str]
) -> Callable[[list[dict[str, str]]], str]:
    """The template as transformers renders it: a sandboxed Jinja environment that trims blocks,
    with ``raise_exception``, ``strftime_now`` and a ``tojson`` that keeps non-ASCII text."""
    try:
        import jinja2
        import jinja2.ext
        import jinja2.sandbox
    except ImportError as exc:
        raise RuntimeLoadError("this model's chat template needs the jinja2 package") from exc

    def raise_exception(message: str) -> None:
        raise jinja2.TemplateError(message)

    def tojson(value: object, indent: int | None = None) -> str:
        return json.dumps(value, ensure_ascii=False, indent=indent)

    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        compiled = env.from_string(template)
    except jinja2.TemplateError as exc:
        raise RuntimeLoadError(f"the chat template does not compile: {exc}") from exc

    def render(messages: list[dict[str, str]]) -> str:
        return compiled.render(messages=messages, add_generation_prompt=True, **special_tokens)

    return render


# --- graphs ---------------------------------------------------------------------------------


def _io(session: Any) -> tuple[dict[str, Any], list[str]]:
    return {node.name: node for node in session.get_inputs()}, [node.name for node in session.get_outputs()]


@dataclass(frozen=True, slots=True)
class _CacheSlot:
    """One past_key_values input and the present output that feeds it on the next step."""

    input: str
    output: str
    shape: tuple[int, int]  # heads, head_dim (batch is 1, the past grows)
    dtype: str


@dataclass(slots=True)
class _DecodeState:
    """Per-generation graph state: what the model has seen and, with a cache, its keys/values."""

    tokens: list[int] = field(default_factory=list)
    past: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class DecoderGraph:
    """A causal LM session and how to feed it (see the module docstring for the layouts)."""

    session: Any
    ids_dtype: str
    mask_dtype: str | None
    position_dtype: str | None
    type_ids: bool
    cache: tuple[_CacheSlot, ...]
    use_cache_branch: bool

    def next_logits(self, state: _DecodeState, new_tokens: Sequence[int]) -> Logits:
        """Feeds the tokens the model has not seen yet; returns the logits after the last one."""
        import numpy as np

        start = len(state.tokens)
        state.tokens.extend(new_tokens)
        total = len(state.tokens)
        fed = list(new_tokens) if self.cache else state.tokens
        first = start if self.cache else 0
        ids = np.asarray([fed], dtype=self.ids_dtype)
        feeds: dict[str, Any] = {"input_ids": ids}
        if self.mask_dtype:
            feeds["attention_mask"] = np.ones((1, total), dtype=self.mask_dtype)
        if self.position_dtype:
            feeds["position_ids"] = np.arange(first, total, dtype=self.position_dtype)[None, :]
        if self.type_ids:
            feeds["token_type_ids"] = np.zeros_like(ids)
        for slot in self.cache:
            empty = np.zeros((1, slot.shape[0], 0, slot.shape[1]), dtype=slot.dtype)
            feeds[slot.input] = state.past.get(slot.input, empty)
        if self.use_cache_branch:
            feeds["use_cache_branch"] = np.array([start > 0], dtype=np.bool_)
        outputs = self.session.run(["logits", *(slot.output for slot in self.cache)], feeds)
        state.past = {slot.input: value for slot, value in zip(self.cache, outputs[1:], strict=True)}
        logits = np.asarray(outputs[0])
        if logits.ndim != 3 or logits.shape[1] != len(fed):
            raise GenerationError(f"logits have shape {logits.shape}, expected [1, {len(fed)}, vocab]")
        last: Logits = logits[0, -1].astype(np.float32)
        return last


def _cache_slot(name: str, node: Any, outputs: Sequence[str], config: Mapping[str, Any]) -> _CacheSlot:
    output = "present" + name[len("past_key_values") :]
    if output not in outputs:
        raise RuntimeLoadError(f"cache input {name} has no matching output {output}")
    dtype = _NUMPY_FLOATS.get(node.type)
    shape = list(node.shape)
    if dtype is None or len(shape) != 4:
        raise RuntimeLoadError(
            f"cache input {name} is {node.type} {shape}; "
            "expected float or float16 [batch, heads, past, head_dim]"
        )
    heads_default = (
        config.get("num_key_value_heads") or config.get("num_attention_heads") or config.get("n_head")
    )
    dim_default = config.get("head_dim")
    hidden, attention_heads = config.get("hidden_size"), config.get("num_attention_heads")
    if (
        dim_default is None
        and isinstance(hidden, int)
        and isinstance(attention_heads, int)
        and attention_heads > 0
    ):
        dim_default = hidden // attention_heads
    heads = shape[1] if isinstance(shape[1], int) else heads_default
    head_dim = shape[3] if isinstance(shape[3], int) else dim_default
    if not isinstance(heads, int) or not isinstance(head_dim, int):
        raise RuntimeLoadError(
            f"cache input {name} has symbolic heads/head_dim and config.json does not give them"
        )
    return _CacheSlot(input=name, output=output, shape=(heads, head_dim), dtype=dtype)


def decoder_graph(session: Any, config: Mapping[str, Any]) -> DecoderGraph:
    """Checks a causal LM graph's inputs and works out how to feed each one."""
    inputs, outputs = _io(session)
    if "input_ids" not in inputs:
        raise RuntimeLoadError(f"the LM graph has no input_ids input (inputs: {sorted(inputs)})")
    cache_names = sorted((n for n in inputs if n.startswith("past_key_values.")), key=_layer_order)
    known = {
        "input_ids",
        "attention_mask",
        "position_ids",
        "token_type_ids",
        "use_cache_branch",
        *cache_names,
    }
    if unknown := sorted(set(inputs) - known):
        raise RuntimeLoadError(f"the LM graph needs inputs this runtime cannot feed: {', '.join(unknown)}")

    def int_dtype(name: str) -> str | None:
        if name not in inputs:
            return None
        dtype = _NUMPY_INTS.get(inputs[name].type)
        if dtype is None:
            raise RuntimeLoadError(f"input {name} is {inputs[name].type}; expected int64 or int32")
        return dtype

    ids_dtype = int_dtype("input_ids")
    assert ids_dtype is not None
    return DecoderGraph(
        session=session,
        ids_dtype=ids_dtype,
        mask_dtype=int_dtype("attention_mask"),
        position_dtype=int_dtype("position_ids"),
        type_ids="token_type_ids" in inputs,
        cache=tuple(_cache_slot(n, inputs[n], outputs, config) for n in cache_names),
        use_cache_branch="use_cache_branch" in inputs,
    )


def _layer_order(name: str) -> tuple[int, str]:
    parts = name.split(".")
    return (int(parts[1]) if len(parts) > 2 and parts[1].isdigit() else -1, name)


@dataclass(frozen=True, slots=True)
class EncoderGraph:
    """A sentence-embedding session: token vectors mean-pooled over the mask, or its own pooling."""

    session: Any
    output: str
    mask: bool
    type_ids: bool
    pad_id: int

    def embed(self, batch: Sequence[Sequence[int]]) -> npt.NDArray[np.float32]:
        """L2-normalised vectors [len(batch), dim] for token sequences (padded here)."""
        import numpy as np

        if not self.mask and len({len(ids) for ids in batch}) > 1:
            # No mask input: padding would change the result, so run each text on its own.
            return np.concatenate([self.embed([ids]) for ids in batch])
        width = max(len(ids) for ids in batch)
        ids = np.full((len(batch), width), self.pad_id, dtype=np.int64)
        mask = np.zeros((len(batch), width), dtype=np.int64)
        for row, tokens in enumerate(batch):
            ids[row, : len(tokens)] = tokens
            mask[row, : len(tokens)] = 1
        feeds: dict[str, Any] = {"input_ids": ids}
        if self.mask:
            feeds["attention_mask"] = mask
        if self.type_ids:
            feeds["token_type_ids"] = np.zeros_like(ids)
        (out,) = self.session.run([self.output], feeds)
        values = np.asarray(out, dtype=np.float32)
        if self.output == SENTENCE_OUTPUT:
            pooled = values
        else:
            weights = mask[..., None].astype(np.float32)
            pooled = (values * weights).sum(axis=1) / np.clip(weights.sum(axis=1), 1e-9, None)
        norms = np.linalg.norm(pooled, axis=1, keepdims=True)
        result: npt.NDArray[np.float32] = (pooled / np.clip(norms, 1e-12, None)).astype(np.float32)
        return result


def encoder_graph(session: Any, pad_id: int) -> EncoderGraph:
    inputs, outputs = _io(session)
    unknown = sorted(set(inputs) - {"input_ids", "attention_mask", "token_type_ids"})
    if "input_ids" not in inputs or unknown:
        raise RuntimeLoadError(
            "the encoder graph needs input_ids (optional: attention_mask, token_type_ids); "
            f"it has {sorted(inputs)}"
        )
    output = next(name for name in (SENTENCE_OUTPUT, *ENCODER_TOKEN_OUTPUTS) if name in outputs)
    return EncoderGraph(
        session=session,
        output=output,
        mask="attention_mask" in inputs,
        type_ids="token_type_ids" in inputs,
        pad_id=pad_id,
    )


# --- sampling and detokenizing --------------------------------------------------------------


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


# --- loading ----------------------------------------------------------------------------------


def load(*, model_path: Path, model_id: str, n_ctx: int = 2048, n_threads: int | None = None) -> OnnxRuntime:
    """Load a model folder (or an .onnx file whose folder holds its tokenizer) and open a session."""
    try:
        import onnxruntime as ort
        from tokenizers import Tokenizer
    except ImportError as exc:
        raise RuntimeLoadError(
            "onnxruntime and tokenizers are not installed (install edgefleet[onnx])"
        ) from exc
    if model_path.is_file() and model_path.suffix.lower() == ".onnx":
        folder, model_file = model_path.parent, model_path
    elif model_path.is_dir():
        folder, model_file = model_path, find_model_file(model_path)
    else:
        raise RuntimeLoadError(f"model folder not found: {model_path}")
    tokenizer_file = folder / TOKENIZER_FILE
    if not tokenizer_file.is_file():
        raise RuntimeLoadError(f"{folder} has no {TOKENIZER_FILE}: an ONNX model cannot be served without it")
    try:
        tokenizer = Tokenizer.from_file(str(tokenizer_file))
    except Exception as exc:  # tokenizers raises a bare Exception for malformed files
        raise RuntimeLoadError(f"{TOKENIZER_FILE} cannot be loaded: {exc}") from exc
    truncation, padding = tokenizer.truncation, tokenizer.padding
    # The runtime pads and counts itself: a tokenizer that truncates would hide an overflow.
    tokenizer.no_truncation()
    tokenizer.no_padding()
    folder_config = read_folder_config(folder, tokenizer, truncation["max_length"] if truncation else None)

    threads = n_threads if n_threads is not None else _default_threads()
    session = _open_session(ort, model_file, threads)
    _, outputs = _io(session)
    provider = str(session.get_providers()[0])
    context = min(n_ctx, folder_config.max_positions or n_ctx)
    description = RuntimeDescription(
        runtime=RUNTIME_NAME,
        model_id=model_id,
        model_path=model_path,
        n_ctx=context,
        n_threads=threads,
        gpu_offload=provider != CPU_PROVIDER,
        format=common_pb2.MODEL_FORMAT_ONNX,
        device=provider,
    )
    if "logits" in outputs:
        decoder = decoder_graph(session, folder_config.config)
        template = (
            compile_chat_template(folder_config.chat_template, folder_config.special_tokens)
            if folder_config.chat_template
            else None
        )
        capabilities = GENERATIVE if template else frozenset({Capability.COMPLETIONS})
        return OnnxRuntime(
            description=replace(description, capabilities=capabilities),
            tokenizer=tokenizer,
            folder=folder_config,
            decoder=decoder,
            chat_template=template,
        )
    if any(name in outputs for name in (SENTENCE_OUTPUT, *ENCODER_TOKEN_OUTPUTS)):
        pad_id = padding["pad_id"] if padding else None
        if pad_id is None:
            pad_id = tokenizer.token_to_id(folder_config.special_tokens.get("pad_token") or "[PAD]")
        encoder = encoder_graph(session, int(pad_id) if pad_id is not None else 0)
        return OnnxRuntime(
            description=replace(description, capabilities=frozenset({Capability.EMBEDDINGS})),
            tokenizer=tokenizer,
            folder=folder_config,
            encoder=encoder,
        )
    raise RuntimeLoadError(
        f"{model_file.name} is neither a causal LM (output 'logits') nor an encoder (output "
        f"{' / '.join((*ENCODER_TOKEN_OUTPUTS, SENTENCE_OUTPUT))}); its outputs are {outputs}"
    )


def _default_threads() -> int:
    """The CPUs this process may use (what the agent's CLI passes when not told otherwise)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def _open_session(ort: Any, model_file: Path, threads: int) -> Any:
    """A session on the preferred provider; if the accelerator refuses the model, on the CPU."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    providers = choose_providers(ort.get_available_providers())
    try:
        return ort.InferenceSession(str(model_file), sess_options=options, providers=list(providers))
    except Exception as exc:  # onnxruntime's exception classes live in a private module
        if providers == (CPU_PROVIDER,):
            raise RuntimeLoadError(f"ONNX Runtime could not load {model_file.name}: {exc}") from exc
        log.warning("%s refused %s (%s); loading it on the CPU", providers[0], model_file.name, exc)
    try:
        return ort.InferenceSession(str(model_file), sess_options=options, providers=[CPU_PROVIDER])
    except Exception as exc:
        raise RuntimeLoadError(f"ONNX Runtime could not load {model_file.name}: {exc}") from exc


# --- the runtime ------------------------------------------------------------------------------


class OnnxRuntime:
    """A loaded ONNX model folder; implements `edgefleet.agent.runtimes.base.Runtime`."""

    def __init__(
        self,
        *,
        description: RuntimeDescription,
        tokenizer: Any,
        folder: FolderConfig,
        decoder: DecoderGraph | None = None,
        encoder: EncoderGraph | None = None,
        chat_template: Callable[[list[dict[str, str]]], str] | None = None,
    ) -> None:
        self._description = description
        self._tokenizer = tokenizer
        self._folder = folder
        self._decoder = decoder
        self._encoder = encoder
        self._chat_template = chat_template
        self._vocab_size = int(tokenizer.get_vocab_size(with_added_tokens=True))
        self._pieces = TokenizersPieces(tokenizer)
        self._limit = PromptLimit(description.n_ctx, self._pieces.max_token_bytes)
        self._slot = threading.Lock()  # held by the generation or embedding batch in progress
        self._unloaded = False

    def describe(self) -> RuntimeDescription:
        return self._description

    # -- generation --------------------------------------------------------------------------

    def chat(self, messages: Sequence[ChatMessage], params: SamplingParams) -> Completion:
        return collect(self.chat_stream(messages, params))

    def complete(self, prompt: str, params: SamplingParams) -> Completion:
        return collect(self.complete_stream(prompt, params))

    def chat_stream(self, messages: Sequence[ChatMessage], params: SamplingParams) -> SlotGeneration:
        self._require(Capability.COMPLETIONS, Capability.CHAT)
        if self._chat_template is None:
            raise ChatNotSupported(f"{self._description.model_id} has no chat template; use /v1/completions")
        self._limit.check(m.content for m in messages)
        segments = chat_segments(self._chat_template, messages)
        self._limit.check(text for text, _ in segments)
        # The template writes the special tokens itself (BOS included), as transformers assumes;
        # only its own markers become special tokens (see edgefleet.agent.runtimes.prompt).
        return self._start(self._pieces.ids(assemble(segments, self._pieces.specials)), params)

    def complete_stream(self, prompt: str, params: SamplingParams) -> SlotGeneration:
        """A raw prompt is the client's whole prompt: special tokens written in it are honoured
        (the tokenizers library matches them in linear time); too much text is refused first."""
        self._require(Capability.COMPLETIONS, Capability.COMPLETIONS)
        self._limit.check((prompt,))
        tokens = list(self._tokenizer.encode(prompt, add_special_tokens=True).ids)
        if not tokens and self._folder.bos_id is not None:
            tokens = [self._folder.bos_id]
        return self._start(tokens, params)

    def _require(self, needed: Capability, asked: Capability) -> None:
        if needed not in self._description.capabilities:
            raise CapabilityNotSupported(self._description.model_id, asked)

    def _start(self, prompt: list[int], params: SamplingParams) -> SlotGeneration:
        return start_generation(
            slot=self._slot,
            thread=InlineCalls(),  # ONNX Runtime sessions may be called from any thread
            prompt=prompt,
            n_ctx=self._description.n_ctx,
            steps=lambda generation: self._generate(generation, params),
        )

    def _generate(self, generation: SlotGeneration, params: SamplingParams) -> Generator[Delta, None, None]:
        """The token loop; runs with the generation slot held (see SlotGeneration)."""
        decoder = self._loaded(self._decoder)
        budget = self._description.n_ctx - len(generation.prompt)
        if params.max_tokens is not None:
            budget = min(budget, params.max_tokens)
        sampler = Sampler(params, self._vocab_size)
        detokenizer = Detokenizer(self._tokenizer, generation.prompt)
        text = StopTextBuffer(params.stop)
        finish: FinishReason = "length"
        state = _DecodeState()
        pending = generation.prompt
        while generation.completion_tokens < budget:
            try:
                logits = decoder.next_logits(state, pending)
            except RuntimeFailure:
                raise
            except Exception as exc:  # onnxruntime's errors share no public base class
                raise GenerationError(f"ONNX Runtime failed while generating: {exc}") from exc
            token = sampler.choose(logits)
            if token in self._folder.eos_ids:
                finish = "stop"
                break
            generation.completion_tokens += 1
            pending = [token]
            piece = text.feed(detokenizer.feed(token).encode("utf-8"))
            if piece:
                yield Delta(piece)
            if text.stopped:
                finish = "stop"
                break
        tail = text.feed(detokenizer.flush().encode("utf-8"))
        if text.stopped:
            finish = "stop"
        yield Delta(tail + text.flush(), finish)

    # -- embeddings --------------------------------------------------------------------------

    def embed(self, texts: Sequence[str]) -> Embeddings:
        if Capability.EMBEDDINGS not in self._description.capabilities:
            raise CapabilityNotSupported(self._description.model_id, Capability.EMBEDDINGS)
        if not texts:
            raise InvalidPromptError("no input to embed")
        for text in texts:
            self._limit.check((text,))
        encoded = [list(e.ids) for e in self._tokenizer.encode_batch(list(texts), add_special_tokens=True)]
        n_ctx = self._description.n_ctx
        for index, ids in enumerate(encoded):
            if not ids:
                raise InvalidPromptError(f"input {index} is empty")
            if len(ids) > n_ctx:
                raise ContextLengthExceeded(prompt_tokens=len(ids), n_ctx=n_ctx)
        vectors: list[tuple[float, ...]] = []
        with self._slot:
            encoder = self._loaded(self._encoder)
            for start in range(0, len(encoded), EMBED_BATCH):
                try:
                    batch = encoder.embed(encoded[start : start + EMBED_BATCH])
                except Exception as exc:  # onnxruntime's errors share no public base class
                    raise GenerationError(f"ONNX Runtime failed while embedding: {exc}") from exc
                vectors.extend(tuple(float(x) for x in row) for row in batch)
        return Embeddings(vectors=tuple(vectors), prompt_tokens=sum(len(ids) for ids in encoded))

    # -- lifecycle ---------------------------------------------------------------------------

    def smoke_test(self) -> None:
        if self._encoder is not None:
            try:
                self._smoke_embed()
            except RuntimeFailure as exc:
                raise RuntimeSmokeTestError(f"smoke embedding failed: {exc}") from exc
            return
        smoke_generate(self, chat=self._chat_template is not None)

    def _smoke_embed(self) -> None:
        import math

        (vector,) = self.embed(["Hello, world."]).vectors
        norm = math.sqrt(sum(x * x for x in vector))
        if not vector or not all(math.isfinite(x) for x in vector) or abs(norm - 1.0) > 1e-3:
            raise RuntimeSmokeTestError(f"smoke embedding is not a unit vector (norm {norm})")

    def unload(self) -> None:
        with self._slot:  # waits for the request in progress
            self._unloaded = True
            self._decoder = None
            self._encoder = None

    def _loaded(self, graph: Any) -> Any:
        if self._unloaded or graph is None:
            raise RuntimeUnloaded(f"{self._description.model_id} was unloaded")
        return graph
