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
  A constraint (structured output, forced tool calls) adds the grammar engine's mask to each
  step's logits before sampling (:mod:`edgefleet.agent.runtimes.grammar_mask`).
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

This module owns the provider choice, ``load()`` and the runtime (token loop, embeddings,
lifecycle); ``onnx_folder`` reads the folder's files and chat template, ``onnx_graphs`` knows
how to feed decoder and encoder graphs, ``onnx_sampling`` picks tokens and detokenizes.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Generator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, Final

from edgefleet.agent.device.hardware import usable_cpus
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
    FieldNotSupported,
    FinishReason,
    GenerationError,
    InvalidPromptError,
    RuntimeDescription,
    RuntimeFailure,
    RuntimeLoadError,
    RuntimeSmokeTestError,
    RuntimeUnloaded,
    SamplingParams,
    check_budget,
    collect,
    require_support,
    smoke_generate,
)
from edgefleet.agent.runtimes.grammar_mask import GrammarMask, TokenizersGuidance
from edgefleet.agent.runtimes.hf_tokens import TokenizersPieces
from edgefleet.agent.runtimes.onnx_folder import (
    TOKENIZER_FILE,
    FolderConfig,
    compile_chat_template,
    find_model_file,
    read_folder_config,
)
from edgefleet.agent.runtimes.onnx_graphs import (
    ENCODER_TOKEN_OUTPUTS,
    SENTENCE_OUTPUT,
    DecoderGraph,
    DecodeState,
    EncoderGraph,
    decoder_graph,
    encoder_graph,
    session_io,
)
from edgefleet.agent.runtimes.onnx_sampling import Detokenizer, Sampler
from edgefleet.agent.runtimes.prompt import PromptLimit, assemble, chat_segments
from edgefleet.agent.runtimes.slot_generation import InlineCalls, SlotGeneration, start_generation
from edgefleet.agent.runtimes.text import StopTextBuffer
from edgefleet.protos.fleet.v1 import common_pb2

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

EMBED_BATCH = 16  # texts per session run: padding waste stays small, throughput stays good


# --- choosing where to run ------------------------------------------------------------------


def choose_providers(available: Sequence[str]) -> tuple[str, ...]:
    """The best available accelerator (if any) followed by CPU, in PROVIDER_PREFERENCE order.

    One accelerator only: ONNX Runtime assigns each node to the first provider that can run
    it, so listing a second accelerator would split a graph across devices.
    """
    accelerators = [p for p in PROVIDER_PREFERENCE if p != CPU_PROVIDER and p in available]
    return (*accelerators[:1], CPU_PROVIDER)


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

    threads = n_threads if n_threads is not None else usable_cpus()
    session = _open_session(ort, model_file, threads)
    _, outputs = session_io(session)
    provider = str(session.get_providers()[0])
    context = min(n_ctx, folder_config.max_positions or n_ctx)
    description = RuntimeDescription(
        runtime=RUNTIME_NAME,
        model_id=model_id,
        model_path=model_path,
        n_ctx=context,
        vocab_size=int(tokenizer.get_vocab_size(with_added_tokens=True)),
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
            description=replace(description, capabilities=capabilities, constrained_decoding=True),
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
        # Constrained decoding (runtimes.grammar_mask): the engine's tokenizer is built on first use.
        self._guidance = TokenizersGuidance(tokenizer, vocab_size=self._vocab_size, end_tokens=folder.eos_ids)

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
        require_support(self._description, params)  # no logprobs, no logit_bias: refused, not ignored
        # The matcher starts here, so a constraint that fails for this tokenizer is refused
        # before any token is generated.
        guide = self._guidance.start(params.constraint) if params.constraint is not None else None
        generation = start_generation(
            slot=self._slot,
            thread=InlineCalls(),  # ONNX Runtime sessions may be called from any thread
            prompt=prompt,
            n_ctx=self._description.n_ctx,
            steps=lambda generation: self._generate(generation, params, guide),
        )
        check_budget(prompt_tokens=len(prompt), max_tokens=params.max_tokens, n_ctx=self._description.n_ctx)
        return generation

    def tokenize(self, text: str, *, add_special: bool) -> list[int]:
        self._limit.check((text,))
        return list(self._tokenizer.encode(text, add_special_tokens=add_special).ids)

    def detokenize(self, tokens: Sequence[int]) -> str:
        for index, token in enumerate(tokens):
            if not 0 <= token < self._vocab_size:
                raise FieldNotSupported("tokens", f"tokens[{index}] = {token} is not a token id here")
        return str(self._tokenizer.decode(list(tokens), skip_special_tokens=False))

    def _generate(
        self, generation: SlotGeneration, params: SamplingParams, guide: GrammarMask | None
    ) -> Generator[Delta, None, None]:
        """The token loop; runs with the generation slot held (see SlotGeneration). With a
        constraint, the grammar's mask is added to each step's logits before sampling and the
        generation ends once the grammar is complete."""
        decoder = self._loaded(self._decoder)
        budget = self._description.n_ctx - len(generation.prompt)
        if params.max_tokens is not None:
            budget = min(budget, params.max_tokens)
        sampler = Sampler(params, self._vocab_size)
        detokenizer = Detokenizer(self._tokenizer, generation.prompt)
        text = StopTextBuffer(params.stop)
        finish: FinishReason = "length"
        state = DecodeState()
        pending = generation.prompt
        while generation.completion_tokens < budget:
            try:
                logits = decoder.next_logits(state, pending)
            except RuntimeFailure:
                raise
            except Exception as exc:  # onnxruntime's errors share no public base class
                raise GenerationError(f"ONNX Runtime failed while generating: {exc}") from exc
            if guide is not None:
                logits = logits + guide.additive(logits.shape[-1])
            token = sampler.choose(logits)
            if token in self._folder.eos_ids:
                finish = "stop"
                break
            generation.completion_tokens += 1
            complete = guide is not None and guide.advance(token)
            pending = [token]
            piece = text.feed(detokenizer.feed(token).encode("utf-8"))
            if piece:
                yield Delta(piece)
            if text.stopped or complete:  # a finished grammar allows nothing but the end
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
