"""GGUF models through llama-cpp-python.

`llama_cpp` is imported inside `load()` only, so a device that never serves a GGUF model
never pays for importing it.

Generation drives `Llama.generate()` (token by token) rather than `create_completion`, so
that this adapter owns what the API needs to be exact about: the prompt's token count is
known (and checked against the context window, raising a typed error) before any work is
done; completion tokens are counted as they are produced, streamed or not; stop sequences
and partial UTF-8 characters are held back correctly; and a consumer that stops iterating
stops the model within one token. top_k comes from the request (0 turns the cut off, as in
llama.cpp); knobs the API does not expose (min_p, repeat penalty) keep llama-cpp-python's
defaults, so outputs match what the library gives for the same request.

Embeddings: a llama.cpp context built for generation keeps only the last token's logits and
cannot pool, so embeddings use a second context over the *same* `llama_model`: the weights
are shared, in RAM and on the GPU alike, never mapped, repacked or uploaded twice. (A second
`Llama(embedding=True)` over the file was measured at +169 MB RSS for SmolLM2 before
embedding anything, 76 MB of it the CPU backend's repacked copy of the weights; this
context, +18 MB after its first short text.) It is created on the first embeddings request
only, so a device that never embeds pays nothing. Its window is small (`_EMBEDDING_WINDOW`
tokens) because llama.cpp computes a vocabulary-wide logits row for every input token in
embedding mode: memory grows with the longest text seen, about 0.4 MB per token for a 49k
vocabulary (+195 MB after a 500-token text), until the context is freed with the runtime.
Each text is decoded on its own, so its
vector never depends on what it was sent with, and a stream in progress (whose state lives
in the other context) keeps going between texts.

Threads: every call into llama.cpp for one runtime (load, tokenize, each token, close)
runs on that runtime's own long-lived thread. llama.cpp builds that use OpenMP keep a
worker team per calling thread; computing from a new thread while an earlier team is
still spinning was measured here at a third of the speed (31 vs 88 tok/s, SmolLM2 on 2
cores, n_threads=2). One thread also makes the non-thread-safe `Llama` object safe.
A separate "generation slot" lock, taken by the consumer's thread, keeps generations one
at a time (a generation's state lives in the KV cache between tokens) without ever
blocking the llama thread; `unload()` takes the slot too, so memory is never freed under
a running generation.
"""

from __future__ import annotations

import secrets
import threading
from collections.abc import Callable, Generator, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from edgefleet.agent.runtimes.base import (
    Capability,
    CapabilityNotSupported,
    ChatMessage,
    ChatNotSupported,
    Completion,
    ConstraintError,
    ContextLengthExceeded,
    Delta,
    Embeddings,
    FinishReason,
    GenerationError,
    InvalidPromptError,
    RuntimeDescription,
    RuntimeLoadError,
    RuntimeUnloaded,
    SamplingParams,
    check_budget,
    collect,
    require_support,
    smoke_generate,
)
from edgefleet.agent.runtimes.constraints import LlamaGuidance
from edgefleet.agent.runtimes.llama_adapters import LlamaLoras
from edgefleet.agent.runtimes.llama_build import accelerator, refuse_crashing_build
from edgefleet.agent.runtimes.llama_embedder import LlamaEmbedder
from edgefleet.agent.runtimes.llama_logprobs import PendingLogprobs, TokenScores, detokenize
from edgefleet.agent.runtimes.lora import LoraInfo
from edgefleet.agent.runtimes.prompt import (
    Piece,
    PromptLimit,
    SpecialToken,
    SpecialTokens,
    assemble,
    chat_segments,
    seed32,
)
from edgefleet.agent.runtimes.slot_generation import SlotGeneration, start_generation, unload_on_own_thread
from edgefleet.agent.runtimes.text import StopTextBuffer
from edgefleet.protos.fleet.v1 import common_pb2

if TYPE_CHECKING:
    from llama_cpp import Llama

RUNTIME_NAME = "llama.cpp"

# llama-cpp-python's create_completion defaults for knobs the OpenAI API does not expose.
_MIN_P = 0.05
_REPEAT_PENALTY = 1.0

# Longest text the embedding context takes, in tokens (capped by the runtime's n_ctx).
_EMBEDDING_WINDOW = 512

# llama.cpp's enum llama_pooling_type; kept here so describing a model needs no library call.
_POOLING_NONE = 0
_POOLING_MEAN = 1
_POOLING_CLS = 2
_POOLING_LAST = 3
_POOLING_RANK = 4

T = TypeVar("T")


class _LlamaThread:
    """The one OS thread that talks to llama.cpp for a runtime (see the module docstring)."""

    def __init__(self, name: str) -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)

    def call(self, fn: Callable[[], T]) -> T:
        """Run `fn` on the llama thread and wait for it; raises RuntimeUnloaded once stopped."""
        try:
            future = self._executor.submit(fn)
        except RuntimeError as exc:  # submit() after shutdown: the runtime was unloaded
            raise RuntimeUnloaded("the model was unloaded") from exc
        return future.result()

    def post(self, fn: Callable[[], None]) -> None:
        """Queue `fn` on the llama thread without waiting; `fn` must handle its own errors."""
        try:
            self._executor.submit(fn)
        except RuntimeError as exc:
            raise RuntimeUnloaded("the model was unloaded") from exc

    def stop(self) -> None:
        self._executor.shutdown(wait=True)


def load(
    *, model_path: Path, model_id: str, n_ctx: int = 2048, n_threads: int | None = None
) -> LlamaCppRuntime:
    """Load a GGUF file; offload all layers to the GPU when this llama.cpp build can."""
    try:
        import llama_cpp
    except ImportError as exc:
        raise RuntimeLoadError("llama-cpp-python is not installed (install edgefleet[agent])") from exc
    if not model_path.is_file():
        raise RuntimeLoadError(f"model file not found: {model_path}")
    refuse_crashing_build(llama_cpp.llama_print_system_info().decode(errors="replace"))
    gpu_offload = bool(llama_cpp.llama_supports_gpu_offload())
    thread = _LlamaThread(f"llama-cpp-{model_id}")

    def construct() -> Llama:
        return llama_cpp.Llama(
            model_path=str(model_path),
            n_ctx=n_ctx,
            n_threads=n_threads,
            n_gpu_layers=-1 if gpu_offload else 0,
            verbose=False,
        )

    try:
        llama = thread.call(construct)
    except (ValueError, RuntimeError, OSError) as exc:
        thread.stop()
        raise RuntimeLoadError(f"llama.cpp could not load {model_path}: {exc}") from exc
    vocab = llama_cpp.llama_model_get_vocab(llama.model)

    def is_end_of_generation(token: int) -> bool:
        return bool(llama_cpp.llama_vocab_is_eog(vocab, token))

    chat_template = _chat_template(llama, llama_cpp, vocab)
    specials, max_token_bytes = _vocabulary(llama_cpp, vocab)
    add_bos = bool(llama_cpp.llama_vocab_get_add_bos(vocab))
    add_eos = bool(llama_cpp.llama_vocab_get_add_eos(vocab))
    pooling = _embedding_pooling(llama.metadata)
    capabilities = {Capability.COMPLETIONS, Capability.LOGPROBS, Capability.LOGIT_BIAS, Capability.LORA}
    if chat_template is not None:
        capabilities.add(Capability.CHAT)
    if pooling is not None:
        capabilities.add(Capability.EMBEDDINGS)
    description = RuntimeDescription(
        runtime=RUNTIME_NAME,
        model_id=model_id,
        model_path=model_path,
        n_ctx=llama.n_ctx(),
        vocab_size=int(llama.n_vocab()),
        n_threads=int(llama.n_threads),
        gpu_offload=gpu_offload,
        format=common_pb2.MODEL_FORMAT_GGUF,
        capabilities=frozenset(capabilities),
        device=accelerator(gpu_offload),
        constrained_decoding=True,
    )
    tokenizer = _Tokenizer(
        llama_cpp,
        vocab,
        specials=specials,
        bos=llama.token_bos() if add_bos else None,
        eos=llama.token_eos() if add_eos else None,
    )
    return LlamaCppRuntime(
        llama,
        thread=thread,
        description=description,
        chat_template=chat_template,
        is_end_of_generation=is_end_of_generation,
        tokenizer=tokenizer,
        max_token_bytes=max_token_bytes,
        embedding_pooling=pooling,
        guidance=LlamaGuidance(llama_cpp, vocab, end_tokens=(llama.token_eos(), _eot(llama_cpp, vocab))),
    )


def _eot(llama_cpp: Any, vocab: Any) -> int:
    """The end-of-turn token (chat models end replies with it), or -1."""
    return int(llama_cpp.llama_vocab_eot(vocab)) if hasattr(llama_cpp, "llama_vocab_eot") else -1


def _vocabulary(llama_cpp: Any, vocab: Any) -> tuple[SpecialTokens, int]:
    """The tokens llama.cpp matches whole before tokenizing (control, unknown and user-defined
    ones, as its own special-token cache has them), and the longest token text in bytes."""
    whole = llama_cpp.LLAMA_TOKEN_ATTR_CONTROL | llama_cpp.LLAMA_TOKEN_ATTR_UNKNOWN
    matched = whole | llama_cpp.LLAMA_TOKEN_ATTR_USER_DEFINED
    specials: list[SpecialToken] = []
    longest = 1
    for token in range(int(llama_cpp.llama_vocab_n_tokens(vocab))):
        text = bytes(llama_cpp.llama_vocab_get_text(vocab, token) or b"")
        longest = max(longest, len(text))
        attr = int(llama_cpp.llama_vocab_get_attr(vocab, token))
        if attr & matched and text:
            specials.append(
                SpecialToken(
                    id=token,
                    text=text.decode("utf-8", errors="replace"),
                    control=bool(attr & whole),
                    lstrip=bool(attr & llama_cpp.LLAMA_TOKEN_ATTR_LSTRIP),
                    rstrip=bool(attr & llama_cpp.LLAMA_TOKEN_ATTR_RSTRIP),
                )
            )
    return SpecialTokens(specials), longest


class _Tokenizer:
    """llama.cpp tokenizing by pieces: markers found in Python (see `edgefleet.agent.runtimes.prompt`),
    the text between them through `llama_tokenize` with special parsing off. Called on the
    llama thread only."""

    def __init__(
        self, llama_cpp: Any, vocab: Any, *, specials: SpecialTokens, bos: int | None, eos: int | None
    ):
        self._lib = llama_cpp
        self._vocab = vocab
        self.specials = specials
        self._bos = bos if bos is not None and bos >= 0 else None
        self._eos = eos if eos is not None and eos >= 0 else None

    def text(self, text: str) -> list[int]:
        """Plain text, no BOS, no marker parsed (user-defined tokens aside, as llama.cpp does)."""
        data = text.encode("utf-8", errors="replace")
        if not data:
            return []
        capacity = len(data) + 8  # a token covers at least one byte; SPM may add a space
        while True:
            buffer = (self._lib.llama_token * capacity)()
            count = int(
                self._lib.llama_tokenize(self._vocab, data, len(data), buffer, capacity, False, False)
            )
            if count >= 0:
                return list(buffer[:count])
            capacity = -count

    def pieces(self, pieces: list[Piece], *, add_special: bool) -> list[int]:
        """Token ids for pieces; with ``add_special`` the BOS/EOS the model adds itself."""
        tokens: list[int] = [self._bos] if add_special and self._bos is not None else []
        for piece in pieces:
            if isinstance(piece, int):
                tokens.append(piece)
            else:
                tokens.extend(self.text(piece))
        if add_special and self._eos is not None:
            tokens.append(self._eos)
        return tokens


def _embedding_pooling(metadata: dict[str, str]) -> int | None:
    """How to pool token states into one vector: the model's own declaration when it makes
    one (embedding GGUFs carry `<arch>.pooling_type`), mean pooling otherwise (a generative
    model declares nothing; mean is the usual choice for decoder embeddings). None for a
    reranker (RANK pooling): its output is a relevance score, not an embedding."""
    declared = metadata.get(f"{metadata.get('general.architecture', '')}.pooling_type")
    if declared is None:
        return _POOLING_MEAN
    try:
        kind = int(declared)
    except ValueError:
        return _POOLING_MEAN
    if kind == _POOLING_RANK:
        return None
    return kind if kind in (_POOLING_MEAN, _POOLING_CLS, _POOLING_LAST) else _POOLING_MEAN


def _chat_template(llama: Llama, llama_cpp: Any, vocab: Any) -> Callable[[list[dict[str, str]]], str] | None:
    """The GGUF's own chat template as a function, or None for base models without one."""
    template = llama.metadata.get("tokenizer.chat_template")
    if not template:
        return None
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    def token_text(token: int) -> str:
        if token < 0:
            return ""
        return bytes(llama_cpp.llama_vocab_get_text(vocab, token)).decode("utf-8", errors="replace")

    formatter = Jinja2ChatFormatter(
        template=template,
        eos_token=token_text(llama.token_eos()),
        bos_token=token_text(llama.token_bos()),
        add_generation_prompt=True,
    )

    def render(messages: list[dict[str, str]]) -> str:
        return str(formatter(messages=messages).prompt)  # type: ignore[arg-type]

    return render


class LlamaCppRuntime:
    """A loaded GGUF model; implements `edgefleet.agent.runtimes.base.Runtime` and, with LoRA
    adapters over it (`edgefleet.agent.runtimes.llama_adapters`), `lora.LoraRuntime`."""

    def __init__(
        self,
        llama: Llama,
        *,
        thread: _LlamaThread,
        description: RuntimeDescription,
        chat_template: Callable[[list[dict[str, str]]], str] | None,
        is_end_of_generation: Callable[[int], bool],
        tokenizer: _Tokenizer,
        max_token_bytes: int,
        embedding_pooling: int | None = None,
        guidance: LlamaGuidance | None = None,
    ) -> None:
        self._llama: Llama | None = llama  # touched on the llama thread only
        self._guidance = guidance  # constrained decoding (runtimes.constraints), llama thread only
        self._tokenizer = tokenizer
        self._thread = thread
        self._description = description
        self._chat_template = chat_template
        self._is_eog = is_end_of_generation
        self._slot = threading.Lock()  # held by the generation in progress
        self._pooling = embedding_pooling
        self._embedder: LlamaEmbedder | None = None  # created on first use, on the llama thread
        self._embedding_window = min(_EMBEDDING_WINDOW, description.n_ctx)
        self._limit = PromptLimit(description.n_ctx, max_token_bytes)
        self._embedding_limit = PromptLimit(self._embedding_window, max_token_bytes)
        self._loras = LlamaLoras(thread=thread, loaded=self._loaded, base_path=description.model_path)

    def describe(self) -> RuntimeDescription:
        return self._description

    def chat(self, messages: Sequence[ChatMessage], params: SamplingParams) -> Completion:
        return collect(self.chat_stream(messages, params))

    def complete(self, prompt: str, params: SamplingParams) -> Completion:
        return collect(self.complete_stream(prompt, params))

    def chat_stream(self, messages: Sequence[ChatMessage], params: SamplingParams) -> SlotGeneration:
        """Only the template's own markers are control tokens; message text never is (see
        `edgefleet.agent.runtimes.prompt`). Too much text is refused before rendering or tokenizing."""
        if self._chat_template is None:
            raise ChatNotSupported(f"{self._description.model_id} has no chat template; use /v1/completions")
        self._limit.check(m.content for m in messages)
        segments = chat_segments(self._chat_template, messages)
        self._limit.check(text for text, _ in segments)
        pieces = assemble(segments, self._tokenizer.specials)

        def tokenize() -> list[int]:
            self._loaded()
            # Templates write their own special tokens (BOS included), as llama-cpp-python assumes.
            return self._tokenizer.pieces(pieces, add_special=False)

        return self._start(self._thread.call(tokenize), params)

    def complete_stream(self, prompt: str, params: SamplingParams) -> SlotGeneration:
        """A raw prompt is the client's whole prompt: markers written in it are honoured and
        BOS added if the model wants one, as Llama.create_completion does; tokenizing stays
        linear and bounded (see `edgefleet.agent.runtimes.prompt`)."""
        self._limit.check((prompt,))
        pieces = assemble(((prompt, True),), self._tokenizer.specials)

        def tokenize() -> list[int]:
            llama = self._loaded()
            tokens = self._tokenizer.pieces(pieces, add_special=True)
            if not tokens and llama.token_bos() >= 0:
                tokens = [llama.token_bos()]
            return tokens

        return self._start(self._thread.call(tokenize), params)

    def embed(self, texts: Sequence[str]) -> Embeddings:
        """Mean-pooled (or model-pooled), L2-normalised vectors, one per text, in order.

        Every text is tokenized and checked before any is embedded, so a bad input fails
        the whole request without work. The generation slot is not taken: embeddings use
        their own context, and each text is one step on the llama thread, between tokens
        of whatever stream is running."""
        if self._pooling is None:
            raise CapabilityNotSupported(self._description.model_id, Capability.EMBEDDINGS)
        window = self._embedding_window
        for text in texts:
            self._embedding_limit.check((text,))
        inputs_as_pieces = [assemble(((text, False),), self._tokenizer.specials) for text in texts]

        def tokenize() -> list[list[int]]:
            # As Llama.embed does: BOS/EOS if the model wants them, special tokens as text.
            self._loaded()
            return [self._tokenizer.pieces(pieces, add_special=True) for pieces in inputs_as_pieces]

        inputs = self._thread.call(tokenize)
        for index, tokens in enumerate(inputs):
            if not tokens:
                raise InvalidPromptError(f"input {index} is empty")
            if len(tokens) > window:
                raise ContextLengthExceeded(prompt_tokens=len(tokens), n_ctx=window)
        vectors = tuple(self._thread.call(partial(self._embed_one, tokens)) for tokens in inputs)
        return Embeddings(vectors=vectors, prompt_tokens=sum(len(tokens) for tokens in inputs))

    def _embed_one(self, tokens: list[int]) -> tuple[float, ...]:
        """On the llama thread: one text through the embedding context (created on first use)."""
        llama = self._loaded()
        if self._embedder is None:
            assert self._pooling is not None
            self._embedder = LlamaEmbedder(llama, window=self._embedding_window, pooling=self._pooling)
        return self._embedder.embed(tokens)

    def smoke_test(self) -> None:
        smoke_generate(self, chat=self._chat_template is not None)

    def load_lora(self, name: str, path: Path) -> LoraInfo:
        return self._loras.load(name, path)

    def unload_lora(self, name: str) -> None:
        self._loras.unload(name)

    def loras(self) -> tuple[LoraInfo, ...]:
        return self._loras.infos()

    def unload(self) -> None:
        def close() -> bool:
            llama, self._llama = self._llama, None
            if llama is None:
                return False
            embedder, self._embedder = self._embedder, None
            if embedder is not None:  # before the model it borrows the weights from
                embedder.close()
            self._loras.close(llama)  # adapters too
            llama.close()
            return True

        unload_on_own_thread(self._slot, self._thread, close)

    def _loaded(self) -> Llama:
        if self._llama is None:
            raise RuntimeUnloaded(f"{self._description.model_id} was unloaded")
        return self._llama

    def tokenize(self, text: str, *, add_special: bool) -> list[int]:
        """As a completion prompt is tokenized (markers written in the text are honoured)."""
        self._limit.check((text,))
        pieces = assemble(((text, True),), self._tokenizer.specials)
        return self._thread.call(lambda: self._tokenizer.pieces(pieces, add_special=add_special))

    def detokenize(self, tokens: Sequence[int]) -> str:
        return self._thread.call(lambda: detokenize(self._loaded(), tokens, self._description.vocab_size))

    def _start(self, prompt_tokens: list[int], params: SamplingParams) -> SlotGeneration:
        require_support(self._description, params)  # logit_bias ids are checked against the vocabulary
        self._loras.require(params.lora)
        generation = start_generation(
            slot=self._slot,
            thread=self._thread,
            prompt=prompt_tokens,
            n_ctx=self._description.n_ctx,
            steps=lambda generation: self._generate(generation, params),
        )
        n_ctx = self._description.n_ctx
        check_budget(prompt_tokens=len(prompt_tokens), max_tokens=params.max_tokens, n_ctx=n_ctx)
        return generation

    def _generate(self, generation: SlotGeneration, params: SamplingParams) -> Generator[Delta, None, None]:
        """The token loop; stepped on the llama thread, with the generation slot held."""
        llama = self._loaded()
        prompt = generation.prompt
        budget = self._description.n_ctx - len(prompt)
        if params.max_tokens is not None:
            budget = min(budget, params.max_tokens)
        text = StopTextBuffer(params.stop)
        finish: FinishReason = "length"
        guide = None
        if params.constraint is not None:
            if self._guidance is None:
                raise ConstraintError("this runtime was built without constrained decoding")
            guide = self._guidance.start(params.constraint)
        scores = TokenScores(params, llama)
        pending = PendingLogprobs(scores.wanted)
        processors = [*(guide.processors if guide else ()), *(scores.processors() or ())]
        # Its adapter on the context, and the cache computed under it (another's is set aside).
        lora = self._loras.begin(llama, params.lora)
        if params.seed is not None:
            # A seeded request evaluates its whole prompt from an empty cache, in the same
            # batches every time. Reusing a cached prefix would evaluate only the new tail
            # (often just the last prompt token, as a 1-token batch), and llama.cpp's logits
            # are not bit-identical across batch sizes on every CPU backend: the same seed
            # then samples different text depending on what ran before.
            llama.reset()  # type: ignore[no-untyped-call]  # unannotated in llama-cpp-python
            llama.set_seed(seed32(params.seed))
        else:
            llama.set_seed(secrets.randbits(31))
        tokens = llama.generate(
            prompt,
            top_k=params.top_k,  # llama.cpp skips the cut for k <= 0
            top_p=params.top_p,
            min_p=_MIN_P,
            temp=params.temperature,
            repeat_penalty=_REPEAT_PENALTY,
            frequency_penalty=params.frequency_penalty,
            presence_penalty=params.presence_penalty,
            logits_processor=processors or None,  # type: ignore[arg-type]
        )
        try:
            while generation.completion_tokens < budget:
                try:
                    token = next(tokens)
                except StopIteration:
                    break
                except (RuntimeError, ValueError, OSError) as exc:
                    raise GenerationError(f"llama.cpp failed while generating: {exc}") from exc
                if self._is_eog(token):
                    finish = "stop"
                    break
                generation.completion_tokens += 1
                pending.add(scores.record(token))
                complete = guide is not None and guide.advance(token)
                piece = text.feed(llama.detokenize([token]))
                if piece:
                    yield Delta(piece, logprobs=pending.take())
                if text.stopped or complete:  # a finished grammar allows nothing but the end
                    finish = "stop"
                    break
        finally:
            tokens.close()
            lora.end()
        yield Delta(text.flush(), finish, logprobs=pending.take())
