"""MLX model folders through mlx-lm (Apple silicon; mlx's CPU build elsewhere).

An MLX variant ships as a folder (config.json, safetensors, tokenizer files) packed into one
tar; the updater extracts it and hands this adapter the folder. `mlx` and `mlx_lm` are
imported inside `load()` only, so a device that never serves an MLX model never pays for
importing them (mlx_lm pulls in transformers).

Generation drives `mlx_lm.generate.generate_step` token by token rather than
`stream_generate`, for the same reasons as the llama.cpp adapter: the prompt's token count
is checked against the context window before any work (a typed error, not a truncated
answer); end-of-sequence tokens are not counted as completion tokens; stop sequences and
partial characters are held back by `StopTextBuffer`; and a consumer that stops iterating
stops the model. `generate_step` evaluates the next token asynchronously while the current
one is handed out (that overlap is where mlx gets its speed), so closing a stream discards
at most that one token. Sampling is mlx-lm's own (`make_sampler`, `make_logits_processors`
with its default 20-token penalty window), so outputs match what the library gives. A
constraint adds the grammar engine's mask through one more logits processor
(`_grammar_processor`, :mod:`edgefleet.agent.runtimes.grammar_mask`).

Threads: every mlx call for one runtime (load, tokenize, each token, unload) runs on that
runtime's own long-lived thread. mlx streams belong to the thread that made them, and
`generate_step` keeps a stream context open across its yields: stepping or closing it from
another thread corrupts that context ("StreamContext destroyed in a different thread" and,
at interpreter exit, an abort). The API consumes generations from whichever worker thread
it has, so the adapter never lets those threads touch mlx. The one thread also serialises
the Hugging Face tokenizer, which is not safe to call concurrently. A separate "generation
slot" lock, taken by the consumer's thread, keeps generations one at a time (a generation's
state lives in its KV cache and in mlx's global random state between tokens); `unload()`
takes the slot too, so memory is never freed under a running generation.
"""

from __future__ import annotations

import json
import queue
import secrets
import threading
from collections.abc import Callable, Generator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar, cast

from edgefleet.agent.runtimes.base import (
    GENERATIVE,
    Capability,
    CapabilityNotSupported,
    ChatMessage,
    ChatNotSupported,
    Completion,
    Delta,
    Embeddings,
    FieldNotSupported,
    FinishReason,
    GenerationError,
    RuntimeDescription,
    RuntimeLoadError,
    RuntimeUnloaded,
    SamplingParams,
    check_budget,
    collect,
    require_support,
    smoke_generate,
)
from edgefleet.agent.runtimes.grammar_mask import GrammarMask, TokenizersGuidance
from edgefleet.agent.runtimes.hf_tokens import TokenizersPieces
from edgefleet.agent.runtimes.prompt import PromptLimit, assemble, chat_segments, seed32
from edgefleet.agent.runtimes.slot_generation import SlotGeneration, start_generation, unload_on_own_thread
from edgefleet.agent.runtimes.text import StopTextBuffer
from edgefleet.protos.fleet.v1 import common_pb2

if TYPE_CHECKING:
    from mlx.nn.layers.base import Module
    from mlx_lm.tokenizer_utils import TokenizerWrapper

RUNTIME_NAME = "mlx"


# What mlx and mlx-lm raise for unreadable folders and failed evaluations: missing files
# (OSError), bad JSON or unknown architectures (ValueError), wrong or missing tensors
# (KeyError, ValueError) and mlx's own runtime errors (RuntimeError).
_MLX_ERRORS = (OSError, ValueError, KeyError, RuntimeError)

T = TypeVar("T")


class _MlxThread:
    """The one OS thread that talks to mlx for a runtime (see the module docstring).

    A daemon thread rather than a ThreadPoolExecutor's: mlx's CPU build aborts the process at
    exit ("terminate called without an active exception") when a thread that used its
    streams is still being wound down during interpreter shutdown, which is what happens to
    an executor thread of a runtime nobody unloaded. When stopped, the thread destroys the
    streams it created (`mx.clear_streams`) before it ends, for the same reason.
    """

    def __init__(self, name: str) -> None:
        self._jobs: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self._lock = threading.Lock()  # makes "stopped" and "queued" one decision
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def call(self, fn: Callable[[], T]) -> T:
        """Run `fn` on the mlx thread and wait for it; raises RuntimeUnloaded once stopped."""
        future: Future[T] = Future()

        def job() -> None:
            if not future.set_running_or_notify_cancel():
                return
            try:
                future.set_result(fn())
            except BaseException as exc:  # handed to the caller, as concurrent.futures does
                future.set_exception(exc)

        with self._lock:
            if self._stopped:
                raise RuntimeUnloaded("the model was unloaded")
            self._jobs.put(job)
        return future.result()

    def stop(self) -> None:
        """Finish the queued calls, free this thread's mlx streams and end the thread."""
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
            self._jobs.put(None)
        self._thread.join()

    def _run(self) -> None:
        import mlx.core as mx

        while (job := self._jobs.get()) is not None:
            job()
        mx.clear_streams()


@dataclass(slots=True)
class _Loaded:
    """The model and its tokenizer; dropped as a whole on unload."""

    model: Module
    tokenizer: TokenizerWrapper
    pieces: TokenizersPieces  # the fast tokenizer behind it, for prompts built from pieces
    guidance: TokenizersGuidance  # constrained decoding over that same fast tokenizer


def load(*, model_path: Path, model_id: str, n_ctx: int = 2048, n_threads: int | None = None) -> MlxRuntime:
    """Load an MLX model folder; mlx runs it on its default device (the GPU on Apple silicon).

    `n_ctx` is capped at the model's trained context (`max_position_embeddings`) when the
    config names one: mlx-lm's cache would grow past it, but the answers would be garbage.
    `n_threads` is accepted for the common factory signature and ignored: mlx has no
    thread-count setting, and its evaluation is driven from the runtime's one thread.
    """
    del n_threads
    try:
        import mlx.core as mx
        import mlx_lm
    except (ImportError, OSError) as exc:
        raise RuntimeLoadError("mlx-lm is not installed (install edgefleet[mlx])") from exc
    # mlx_lm.load() treats a path that does not exist as a Hugging Face repo id and downloads
    # it: a device must never do that, so the folder is checked here first.
    if not model_path.exists():
        raise RuntimeLoadError(f"model folder not found: {model_path}")
    if not model_path.is_dir():
        raise RuntimeLoadError(f"{model_path} is not a folder: MLX models ship as a folder")
    config = _read_config(model_path)
    thread = _MlxThread(f"mlx-{model_id}")

    def construct() -> tuple[_Loaded, str]:
        model, tokenizer = mlx_lm.load(str(model_path))[:2]
        backend = getattr(tokenizer._tokenizer, "backend_tokenizer", None)
        if backend is None:
            raise ValueError("the folder has no fast tokenizer (tokenizer.json)")
        guidance = TokenizersGuidance(
            backend,
            vocab_size=int(backend.get_vocab_size(with_added_tokens=True)),
            end_tokens=sorted(tokenizer.eos_token_ids),
        )
        return _Loaded(model, tokenizer, TokenizersPieces(backend), guidance), _device_name(mx)

    try:
        loaded, device = thread.call(construct)
    except (*_MLX_ERRORS, ImportError) as exc:  # ImportError: a model type this mlx-lm lacks
        thread.stop()
        raise RuntimeLoadError(f"mlx-lm could not load {model_path}: {exc}") from exc
    trained = config.get("max_position_embeddings")
    description = RuntimeDescription(
        runtime=RUNTIME_NAME,
        model_id=model_id,
        model_path=model_path,
        n_ctx=min(n_ctx, trained) if isinstance(trained, int) and trained > 0 else n_ctx,
        n_threads=1,
        gpu_offload=device != "cpu",
        format=common_pb2.MODEL_FORMAT_MLX,
        capabilities=GENERATIVE,
        device=device,
        constrained_decoding=True,
    )
    return MlxRuntime(loaded, thread=thread, description=description)


def _read_config(folder: Path) -> dict[str, Any]:
    """The folder's config.json, or a load error that says what is wrong with it."""
    path = folder / "config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise RuntimeLoadError(f"{folder} is not an MLX model folder: no config.json") from exc
    except (OSError, ValueError) as exc:
        raise RuntimeLoadError(f"{path} is unreadable: {exc}") from exc
    if not isinstance(config, dict):
        raise RuntimeLoadError(f"{path} is not a JSON object")
    return config


def _device_name(mx: Any) -> str:
    """Where mlx computes: "metal" on Apple silicon, "cuda" with mlx's CUDA build, else "cpu"."""
    if mx.default_device().type != mx.gpu:
        return "cpu"
    if mx.metal.is_available():
        return "metal"
    if mx.cuda.is_available():
        return "cuda"
    return "gpu"


class MlxRuntime:
    """A loaded MLX model; implements `edgefleet.agent.runtimes.base.Runtime`."""

    def __init__(self, loaded: _Loaded, *, thread: _MlxThread, description: RuntimeDescription) -> None:
        self._loaded: _Loaded | None = loaded  # touched on the mlx thread only
        self._thread = thread
        self._description = description
        self._has_chat_template = bool(loaded.tokenizer.has_chat_template)
        self._slot = threading.Lock()  # held by the generation in progress
        self._limit = PromptLimit(description.n_ctx, loaded.pieces.max_token_bytes)
        self._guidance = loaded.guidance  # no mlx inside: usable from the caller's thread

    def describe(self) -> RuntimeDescription:
        return self._description

    def chat(self, messages: Sequence[ChatMessage], params: SamplingParams) -> Completion:
        return collect(self.chat_stream(messages, params))

    def complete(self, prompt: str, params: SamplingParams) -> Completion:
        return collect(self.complete_stream(prompt, params))

    def chat_stream(self, messages: Sequence[ChatMessage], params: SamplingParams) -> SlotGeneration:
        if not self._has_chat_template:
            raise ChatNotSupported(f"{self._description.model_id} has no chat template; use /v1/completions")
        self._limit.check(m.content for m in messages)

        def tokenize() -> list[int]:
            loaded = self._model()
            # mlx-lm leaves this wrapper method unannotated; with tokenize=False it returns text.
            apply = cast(Callable[..., str], loaded.tokenizer.apply_chat_template)

            def render(conversation: list[dict[str, str]]) -> str:
                return apply(conversation, add_generation_prompt=True, tokenize=False)

            # The template writes its own special tokens (BOS included); only those become
            # special tokens, message text never does (see edgefleet.agent.runtimes.prompt).
            segments = chat_segments(render, messages)
            self._limit.check(text for text, _ in segments)
            return loaded.pieces.ids(assemble(segments, loaded.pieces.specials))

        return self._start(self._thread.call(tokenize), params)

    def complete_stream(self, prompt: str, params: SamplingParams) -> SlotGeneration:
        """A raw prompt is the client's whole prompt: special tokens written in it are honoured;
        too much text is refused before the tokenizer runs."""
        self._limit.check((prompt,))

        def tokenize() -> list[int]:
            # Same tokenization as mlx_lm.stream_generate: BOS unless the prompt writes it.
            tokenizer = self._model().tokenizer
            bos: str | None = tokenizer.bos_token
            add_special = bos is None or not prompt.startswith(bos)
            tokens = [int(t) for t in tokenizer.encode(prompt, add_special_tokens=add_special)]
            bos_id: int | None = tokenizer.bos_token_id
            if not tokens and bos_id is not None:
                tokens = [bos_id]
            return tokens

        return self._start(self._thread.call(tokenize), params)

    def embed(self, texts: Sequence[str]) -> Embeddings:
        raise CapabilityNotSupported(self._description.model_id, Capability.EMBEDDINGS)

    def smoke_test(self) -> None:
        smoke_generate(self, chat=self._has_chat_template)

    def unload(self) -> None:
        def release() -> bool:
            loaded, self._loaded = self._loaded, None
            if loaded is None:
                return False
            del loaded  # the last reference to the weights
            import mlx.core as mx

            mx.clear_cache()  # hand the freed buffers back instead of keeping them for reuse
            return True

        unload_on_own_thread(self._slot, self._thread, release)

    def _model(self) -> _Loaded:
        if self._loaded is None:
            raise RuntimeUnloaded(f"{self._description.model_id} was unloaded")
        return self._loaded

    def _start(self, prompt_tokens: list[int], params: SamplingParams) -> SlotGeneration:
        require_support(self._description, params)  # no logprobs, no logit_bias: refused, not ignored
        # The matcher starts here, so a constraint that fails for this tokenizer is refused
        # before any token is generated.
        guide = self._guidance.start(params.constraint) if params.constraint is not None else None
        generation = start_generation(
            slot=self._slot,
            thread=self._thread,
            prompt=prompt_tokens,
            n_ctx=self._description.n_ctx,
            steps=lambda generation: self._generate(generation, params, guide),
        )
        check_budget(
            prompt_tokens=len(prompt_tokens), max_tokens=params.max_tokens, n_ctx=self._description.n_ctx
        )
        return generation

    def tokenize(self, text: str, *, add_special: bool) -> list[int]:
        self._limit.check((text,))
        return self._thread.call(
            lambda: [int(t) for t in self._model().tokenizer.encode(text, add_special_tokens=add_special)]
        )

    def detokenize(self, tokens: Sequence[int]) -> str:
        def decode() -> str:
            tokenizer = self._model().tokenizer
            size = len(tokenizer.vocab)
            for index, token in enumerate(tokens):
                if not 0 <= token < size:
                    raise FieldNotSupported("tokens", f"tokens[{index}] = {token} is not a token id here")
            return str(tokenizer.decode(list(tokens)))

        return self._thread.call(decode)

    def _generate(
        self, generation: SlotGeneration, params: SamplingParams, guide: GrammarMask | None
    ) -> Generator[Delta, None, None]:
        """The token loop; stepped on the mlx thread, with the generation slot held. With a
        constraint, a logits processor adds the grammar's mask to each step's logits (see
        `_grammar_processor`) and the generation ends once the grammar is complete."""
        import mlx.core as mx
        from mlx_lm.generate import generate_step, generation_stream, wired_limit
        from mlx_lm.sample_utils import make_logits_processors, make_sampler

        loaded = self._model()
        budget = self._description.n_ctx - len(generation.prompt)
        if params.max_tokens is not None:
            budget = min(budget, params.max_tokens)
        text = StopTextBuffer(params.stop)
        if budget <= 0:
            yield Delta(text.flush(), "length")
            return
        mx.random.seed(seed32(params.seed) if params.seed is not None else secrets.randbits(32))
        sampler = make_sampler(temp=params.temperature, top_p=params.top_p, top_k=params.top_k)
        processors = make_logits_processors(
            presence_penalty=params.presence_penalty, frequency_penalty=params.frequency_penalty
        )
        if guide is not None:
            processors.append(_grammar_processor(guide, len(generation.prompt)))
        end_tokens = loaded.tokenizer.eos_token_ids
        detokenizer = loaded.tokenizer.detokenizer
        finish: FinishReason = "length"
        # On Apple silicon, keep the weights resident while generating (a no-op on the CPU).
        # mlx-lm annotates `streams` as plain Streams but passes its thread-local one itself.
        streams: list[Any] = [generation_stream]
        with wired_limit(loaded.model, streams):
            tokens = generate_step(
                mx.array(generation.prompt),
                loaded.model,
                max_tokens=budget,
                sampler=sampler,
                logits_processors=processors,
            )
            try:
                while generation.completion_tokens < budget:
                    try:
                        token, _logprobs = next(tokens)
                    except StopIteration:
                        break
                    except _MLX_ERRORS as exc:
                        raise GenerationError(f"mlx failed while generating: {exc}") from exc
                    if token in end_tokens:
                        finish = "stop"
                        break
                    complete = guide is not None and guide.follow(generation.completion_tokens, int(token))
                    generation.completion_tokens += 1
                    detokenizer.add_token(token)
                    piece = text.feed(detokenizer.last_segment.encode("utf-8"))
                    if piece:
                        yield Delta(piece)
                    if text.stopped or complete:  # a finished grammar allows nothing but the end
                        finish = "stop"
                        break
            finally:
                tokens.close()
        tail = ""
        if not text.stopped:  # the detokenizer may still hold the end of a word
            detokenizer.finalize()
            tail = text.feed(detokenizer.last_segment.encode("utf-8"))
            if text.stopped:
                finish = "stop"
        yield Delta(tail + text.flush(), finish)


def _grammar_processor(guide: GrammarMask, prompt_length: int) -> Callable[[Any, Any], Any]:
    """An mlx-lm logits processor that adds the grammar's mask to the logits.

    `generate_step` builds step t+1 before it hands out token t (its one-token overlap), so the
    processor, which sees the whole token history, follows the tokens the grammar has not seen
    yet itself; the token loop then finds them followed (`GrammarMask.follow`). Reading that
    last token waits for its evaluation: a constrained step cannot overlap with the next one.
    """
    import mlx.core as mx

    def process(tokens: Any, logits: Any) -> Any:
        fresh = tokens[prompt_length + guide.consumed :].tolist()
        for index, token in enumerate(fresh, start=guide.consumed):
            guide.follow(index, int(token))
        return logits + mx.array(guide.additive(int(logits.shape[-1])))

    return process
