"""Tiny Llama-architecture models for the MLX tests, built on the spot (no model download).

A source folder is Hugging Face-style: a ~0.5M-parameter LlamaForCausalLM config, random
float32 weights written with safetensors' numpy API, and a 512-token byte-level BPE
tokenizer trained on the ladder's evaluation text with the ``tokenizers`` package.
``mlx_variant`` turns it into what a device really receives: an mlx-lm converted, affine
group-quantized folder. Random weights make the text meaningless but deterministic, which
is what runtime and ladder tests need; nothing here checks quality.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from edgefleet.controlplane.build.ladder import default_eval_text

HIDDEN, FFN, LAYERS, HEADS, VOCAB = 128, 256, 2, 4, 512
MAX_POSITIONS = 1024
BOS, EOS = "<s>", "</s>"

# A minimal chat template in the usual Hugging Face form: the template writes BOS itself and
# ends with the assistant's turn opened when a generation prompt is asked for.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{{ message['role'] }}: {{ message['content'] }}\n"
    "{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}"
)


def render_chat(messages: list[tuple[str, str]]) -> str:
    """What CHAT_TEMPLATE renders for (role, content) pairs, written out by hand for tests."""
    return BOS + "".join(f"{role}: {content}\n" for role, content in messages) + "assistant:"


def write_tokenizer(folder: Path, text: str, *, chat_template: str | None = None) -> int:
    """Train a byte-level BPE tokenizer on `text` into `folder`; returns its vocabulary size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[BOS, EOS],
    )
    tokenizer.train_from_iterator([text], trainer=trainer)
    tokenizer.save(str(folder / "tokenizer.json"))
    config: dict[str, object] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": EOS,
        "model_max_length": 1 << 20,  # the eval text is tokenized whole, then windowed
    }
    if chat_template is not None:
        config["chat_template"] = chat_template
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    vocab: int = tokenizer.get_vocab_size()
    return vocab


def build_llama(
    folder: Path, *, chat_template: str | None = None, weight_std: float = 0.02, seed: int = 7
) -> Path:
    """Write a tiny random LlamaForCausalLM source folder; returns `folder`.

    The default 0.02 spread is the usual initialisation, which makes every position predict
    about the same token; a larger `weight_std` gives peaked, context-dependent logits, so
    greedy text varies from token to token (useful for stop-sequence tests).
    """
    from safetensors.numpy import save_file

    folder.mkdir(parents=True)
    vocab = write_tokenizer(folder, default_eval_text(), chat_template=chat_template)
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": HIDDEN,
        "intermediate_size": FFN,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS,
        "num_key_value_heads": HEADS,
        "vocab_size": vocab,
        "rms_norm_eps": 1e-5,
        "max_position_embeddings": MAX_POSITIONS,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
        "bos_token_id": 0,
        "eos_token_id": 1,
        "hidden_act": "silu",
    }
    (folder / "config.json").write_text(json.dumps(config))
    rng = np.random.default_rng(seed)
    shapes = {
        "model.embed_tokens.weight": (vocab, HIDDEN),
        "lm_head.weight": (vocab, HIDDEN),
    }
    for layer in range(LAYERS):
        prefix = f"model.layers.{layer}."
        shapes |= {
            prefix + "self_attn.q_proj.weight": (HIDDEN, HIDDEN),
            prefix + "self_attn.k_proj.weight": (HIDDEN, HIDDEN),
            prefix + "self_attn.v_proj.weight": (HIDDEN, HIDDEN),
            prefix + "self_attn.o_proj.weight": (HIDDEN, HIDDEN),
            prefix + "mlp.gate_proj.weight": (FFN, HIDDEN),
            prefix + "mlp.up_proj.weight": (FFN, HIDDEN),
            prefix + "mlp.down_proj.weight": (HIDDEN, FFN),
        }
    tensors = {name: rng.normal(0, weight_std, shape).astype(np.float32) for name, shape in shapes.items()}
    norms = ["model.norm.weight"] + [
        f"model.layers.{layer}.{norm}.weight"
        for layer in range(LAYERS)
        for norm in ("input_layernorm", "post_attention_layernorm")
    ]
    tensors |= {name: np.ones(HIDDEN, dtype=np.float32) for name in norms}
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder


def mlx_variant(source: Path, dest: Path, quantization: str = "q4") -> Path:
    """Convert and quantize `source` the way the ladder does for a release; returns `dest`."""
    from edgefleet.controlplane.build.ladder.mlx import quantize_mlx

    quantize_mlx(source, dest, quantization)
    return dest
