"""How an ONNX graph is fed: a causal LM's inputs and KV cache, an encoder's pooling.

Decoder graphs exported by Hugging Face Optimum take ``past_key_values.N.key/value`` inputs
[batch, heads, past, head_dim] and give ``present.N.key/value`` outputs (optionally with a
``use_cache_branch`` flag); with a cache the prompt is fed once and then one token per step,
without one the whole sequence is fed every step (correct, but quadratic). Encoders give one
L2-normalised vector per text: token vectors mean-pooled over the attention mask, as
sentence-transformers does, or the graph's own ``sentence_embedding``. The graphs are checked
once, at load, so a graph this runtime cannot feed is a RuntimeLoadError, not a failed request.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from edgefleet.agent.runtimes.base import GenerationError, RuntimeLoadError

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

    Logits = npt.NDArray[np.float32]

ENCODER_TOKEN_OUTPUTS = ("last_hidden_state", "token_embeddings")
SENTENCE_OUTPUT = "sentence_embedding"

_NUMPY_FLOATS: Mapping[str, str] = {"tensor(float)": "float32", "tensor(float16)": "float16"}
_NUMPY_INTS: Mapping[str, str] = {"tensor(int64)": "int64", "tensor(int32)": "int32"}


def session_io(session: Any) -> tuple[dict[str, Any], list[str]]:
    return {node.name: node for node in session.get_inputs()}, [node.name for node in session.get_outputs()]


@dataclass(frozen=True, slots=True)
class _CacheSlot:
    """One past_key_values input and the present output that feeds it on the next step."""

    input: str
    output: str
    shape: tuple[int, int]  # heads, head_dim (batch is 1, the past grows)
    dtype: str


@dataclass(slots=True)
class DecodeState:
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

    def next_logits(self, state: DecodeState, new_tokens: Sequence[int]) -> Logits:
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
    inputs, outputs = session_io(session)
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
    inputs, outputs = session_io(session)
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
