"""GGUF models through llama-cpp-python.

`llama_cpp` is imported inside `load()` only, so a device that never serves a GGUF model
never pays for importing it.

Generation drives `Llama.generate()` (token by token) rather than `create_completion`, so
that this adapter owns what the API needs to be exact about: the prompt's token count is
known (and checked against the context window, raising a typed error) before any work is
done; completion tokens are counted as they are produced, streamed or not; stop sequences
and partial UTF-8 characters are held back correctly; and a consumer that stops iterating
stops the model within one token. Sampling defaults not exposed by the OpenAI API (top_k,
min_p, repeat penalty) are llama-cpp-python's own, so outputs match what the library gives.

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
from collections.abc import Callable, Generator, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from agent.runtimes.base import (
    ChatMessage,
    ChatNotSupported,
    Completion,
    ContextLengthExceeded,
    Delta,
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
)
from agent.runtimes.text import StopTextBuffer
from protos.fleet.v1 import common_pb2

if TYPE_CHECKING:
    from llama_cpp import Llama

RUNTIME_NAME = "llama.cpp"

# llama-cpp-python's create_completion defaults for knobs the OpenAI API does not expose.
_TOP_K = 40
_MIN_P = 0.05
_REPEAT_PENALTY = 1.0

_SMOKE_PARAMS = SamplingParams(max_tokens=8, temperature=0.0, seed=0)

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

    description = RuntimeDescription(
        runtime=RUNTIME_NAME,
        model_id=model_id,
        model_path=model_path,
        n_ctx=llama.n_ctx(),
        n_threads=int(llama.n_threads),
        gpu_offload=gpu_offload,
        format=common_pb2.MODEL_FORMAT_GGUF,
    )
    return LlamaCppRuntime(
        llama,
        thread=thread,
        description=description,
        chat_template=_chat_template(llama, llama_cpp, vocab),
        is_end_of_generation=is_end_of_generation,
    )


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
    """A loaded GGUF model; implements `agent.runtimes.base.Runtime`."""

    def __init__(
        self,
        llama: Llama,
        *,
        thread: _LlamaThread,
        description: RuntimeDescription,
        chat_template: Callable[[list[dict[str, str]]], str] | None,
        is_end_of_generation: Callable[[int], bool],
    ) -> None:
        self._llama: Llama | None = llama  # touched on the llama thread only
        self._thread = thread
        self._description = description
        self._chat_template = chat_template
        self._is_eog = is_end_of_generation
        self._slot = threading.Lock()  # held by the generation in progress

    def describe(self) -> RuntimeDescription:
        return self._description

    def chat(self, messages: Sequence[ChatMessage], params: SamplingParams) -> Completion:
        return collect(self.chat_stream(messages, params))

    def complete(self, prompt: str, params: SamplingParams) -> Completion:
        return collect(self.complete_stream(prompt, params))

    def chat_stream(self, messages: Sequence[ChatMessage], params: SamplingParams) -> _LlamaGeneration:
        if self._chat_template is None:
            raise ChatNotSupported(f"{self._description.model_id} has no chat template; use /v1/completions")
        try:
            prompt = self._chat_template([{"role": m.role, "content": m.content} for m in messages])
        except Exception as exc:  # the template is model-supplied Jinja: any failure is a bad prompt
            raise InvalidPromptError(f"the model's chat template rejected the messages: {exc}") from exc

        def tokenize() -> list[int]:
            # Templates write their own special tokens (BOS included), as llama-cpp-python does.
            return self._loaded().tokenize(prompt.encode("utf-8"), add_bos=False, special=True)

        return self._start(self._thread.call(tokenize), params)

    def complete_stream(self, prompt: str, params: SamplingParams) -> _LlamaGeneration:
        def tokenize() -> list[int]:
            # Same tokenization as Llama.create_completion: BOS if the model wants one,
            # special tokens written in the prompt are honoured.
            llama = self._loaded()
            tokens = llama.tokenize(prompt.encode("utf-8"), add_bos=True, special=True)
            if not tokens and llama.token_bos() >= 0:
                tokens = [llama.token_bos()]
            return tokens

        return self._start(self._thread.call(tokenize), params)

    def smoke_test(self) -> None:
        try:
            if self._chat_template is not None:
                result = self.chat([ChatMessage(role="user", content="Say hello.")], _SMOKE_PARAMS)
            else:
                result = self.complete("Hello", _SMOKE_PARAMS)
        except RuntimeFailure as exc:
            raise RuntimeSmokeTestError(f"smoke generation failed: {exc}") from exc
        if result.completion_tokens == 0 or not result.text.strip():
            raise RuntimeSmokeTestError("smoke generation produced no text")

    def unload(self) -> None:
        with self._slot:  # waits for the generation in progress

            def close() -> bool:
                llama, self._llama = self._llama, None
                if llama is None:
                    return False
                llama.close()
                return True

            try:
                closed = self._thread.call(close)
            except RuntimeUnloaded:  # already unloaded: the thread is gone
                return
            if closed:
                self._thread.stop()

    def _loaded(self) -> Llama:
        if self._llama is None:
            raise RuntimeUnloaded(f"{self._description.model_id} was unloaded")
        return self._llama

    def _start(self, prompt_tokens: list[int], params: SamplingParams) -> _LlamaGeneration:
        if not prompt_tokens:
            raise InvalidPromptError("the prompt is empty")
        n_ctx = self._description.n_ctx
        if len(prompt_tokens) >= n_ctx:
            raise ContextLengthExceeded(prompt_tokens=len(prompt_tokens), n_ctx=n_ctx)
        return _LlamaGeneration(self, prompt_tokens, params)

    def _generate(self, generation: _LlamaGeneration, params: SamplingParams) -> Generator[Delta, None, None]:
        """The token loop; stepped on the llama thread, with the generation slot held."""
        llama = self._loaded()
        prompt = generation.prompt
        budget = self._description.n_ctx - len(prompt)
        if params.max_tokens is not None:
            budget = min(budget, params.max_tokens)
        llama.set_seed(params.seed if params.seed is not None else secrets.randbits(32))
        text = StopTextBuffer(params.stop)
        finish: FinishReason = "length"
        tokens = llama.generate(
            prompt,
            top_k=_TOP_K,
            top_p=params.top_p,
            min_p=_MIN_P,
            temp=params.temperature,
            repeat_penalty=_REPEAT_PENALTY,
            frequency_penalty=params.frequency_penalty,
            presence_penalty=params.presence_penalty,
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
                piece = text.feed(llama.detokenize([token]))
                if piece:
                    yield Delta(piece)
                if text.stopped:
                    finish = "stop"
                    break
        finally:
            tokens.close()
        yield Delta(text.flush(), finish)


class _LlamaGeneration:
    """One validated prompt. The first `next()` takes the runtime's generation slot (waiting
    for the generation before it); exhaustion, an error or `close()` gives it back."""

    def __init__(self, runtime: LlamaCppRuntime, prompt: list[int], params: SamplingParams) -> None:
        self.prompt = prompt
        self.completion_tokens = 0
        self._runtime = runtime
        self._steps = runtime._generate(self, params)
        self._holds_slot = False
        self._done = False

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt)

    def __iter__(self) -> Iterator[Delta]:
        return self

    def __next__(self) -> Delta:
        if self._done:
            raise StopIteration
        if not self._holds_slot:
            self._runtime._slot.acquire()
            self._holds_slot = True
        try:
            delta = self._runtime._thread.call(lambda: next(self._steps, None))
        except BaseException:
            self._finish()
            raise
        if delta is None:
            self._finish()
            raise StopIteration
        return delta

    def close(self) -> None:
        try:
            if self._holds_slot and not self._done:
                # Holding the slot means unload() is waiting for us, so the thread is alive.
                self._runtime._thread.call(self._steps.close)
        finally:
            self._finish()

    def _finish(self) -> None:
        self._done = True
        if self._holds_slot:
            self._holds_slot = False
            self._runtime._slot.release()
