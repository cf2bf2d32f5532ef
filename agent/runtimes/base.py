"""The one protocol every inference backend implements, and the values that cross it.

The API, the smoke test and the lifecycle code talk to a `Runtime` only; which backend
sits behind it (llama.cpp, ONNX Runtime or MLX) is the registry's decision. A runtime says
what it can do in its description (`Capability`); asking for anything else raises
`CapabilityNotSupported` (an encoder cannot chat, a chat model may not embed).
Values here are plain frozen dataclasses so they are safe to hand between the worker
thread that generates and the event loop that serves.
"""

from __future__ import annotations

import enum
import math
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol, runtime_checkable

from edgefleet.protos.fleet.release import Refusal, TransientFailure
from edgefleet.protos.fleet.v1 import common_pb2

FinishReason = Literal["stop", "length"]


class Capability(enum.StrEnum):
    """What a loaded model can serve; the API checks before it leases a runtime."""

    CHAT = "chat"
    COMPLETIONS = "completions"
    EMBEDDINGS = "embeddings"
    LOGPROBS = "logprobs"  # SamplingParams.logprobs: each generated token's log probability
    LOGIT_BIAS = "logit_bias"  # SamplingParams.logit_bias: per-token biases added to the logits
    LORA = "lora"  # SamplingParams.lora: LoRA adapters loaded over the model, chosen per request


GENERATIVE = frozenset({Capability.CHAT, Capability.COMPLETIONS})


# --- errors ------------------------------------------------------------------------------


class RuntimeFailure(Exception):
    """Base of every runtime error, for callers that map them all (the API's error table).
    Never raised itself: each concrete error is also in one family, a `Refusal` (this model or
    this request cannot be served; retrying gets the same) or a `TransientFailure` (retrying
    reaches a runtime that can), so the update path decides by family, not by this base."""


class RuntimeLoadError(RuntimeFailure, Refusal):
    """The model file could not be loaded (missing backend, corrupt file, out of memory)."""


class RuntimeSmokeTestError(RuntimeFailure, Refusal):
    """The model loaded but a tiny real generation failed or produced nothing."""


class UnsupportedFormatError(RuntimeFailure, Refusal):
    """No adapter is registered for this model format on this device."""

    def __init__(self, fmt: int) -> None:
        self.fmt = fmt
        super().__init__(f"no runtime adapter for model format {format_name(fmt)}")


class ContextLengthExceeded(RuntimeFailure, Refusal):
    """The prompt leaves no room to generate in the model's context window."""

    def __init__(self, *, prompt_tokens: int, n_ctx: int) -> None:
        self.prompt_tokens = prompt_tokens
        self.n_ctx = n_ctx
        super().__init__(
            f"this model's context window is {n_ctx} tokens, but the prompt has {prompt_tokens} tokens"
        )


class PromptTooLarge(ContextLengthExceeded):
    """The prompt's text is longer than any prompt that fits the window, so it was refused
    before tokenizing: tokenizing it would only cost time on the model's one thread.
    ``prompt_tokens`` is a lower bound (no token covers more than ``max_token_bytes`` bytes)."""

    def __init__(self, *, prompt_bytes: int, max_bytes: int, n_ctx: int, max_token_bytes: int) -> None:
        self.prompt_bytes = prompt_bytes
        self.max_bytes = max_bytes
        self.prompt_tokens = -(-prompt_bytes // max(1, max_token_bytes))
        self.n_ctx = n_ctx
        RuntimeFailure.__init__(
            self,
            f"this model's context window is {n_ctx} tokens, but the prompt has {prompt_bytes} bytes "
            f"of text, more than {max_bytes} bytes could ever fit (at least {self.prompt_tokens} tokens)",
        )


class CompletionBudgetExceeded(ContextLengthExceeded):
    """The prompt fits, but prompt plus the requested completion tokens do not: OpenAI refuses
    such a request (context_length_exceeded) instead of generating fewer tokens than asked."""

    def __init__(self, *, prompt_tokens: int, max_tokens: int, n_ctx: int) -> None:
        self.prompt_tokens = prompt_tokens
        self.max_tokens = max_tokens
        self.n_ctx = n_ctx
        RuntimeFailure.__init__(
            self,
            f"this model's context window is {n_ctx} tokens, but {prompt_tokens + max_tokens} were "
            f"requested ({prompt_tokens} in the prompt, {max_tokens} for the completion); "
            f"ask for at most {max(0, n_ctx - prompt_tokens)} completion tokens",
        )


def check_budget(*, prompt_tokens: int, max_tokens: int | None, n_ctx: int) -> None:
    """Raise CompletionBudgetExceeded when an explicit token limit cannot fit beside the prompt."""
    if max_tokens is not None and prompt_tokens + max_tokens > n_ctx:
        raise CompletionBudgetExceeded(prompt_tokens=prompt_tokens, max_tokens=max_tokens, n_ctx=n_ctx)


class InvalidPromptError(RuntimeFailure, Refusal):
    """The request cannot be turned into a prompt (empty, or refused by the chat template)."""


class FieldNotSupported(InvalidPromptError):
    """A request field this runtime cannot honour (logprobs from a runtime that does not compute
    them, a logit_bias token outside the vocabulary); ``param`` names the field for the 400."""

    def __init__(self, param: str, message: str) -> None:
        self.param = param
        super().__init__(message)


class ChatNotSupported(InvalidPromptError):
    """The model carries no chat template (a base model): only completions make sense."""


class RuntimeUnloaded(RuntimeFailure, TransientFailure):
    """The runtime was unloaded (a newer model was activated); retrying reaches the new one."""


class GenerationError(RuntimeFailure, Refusal):
    """The backend failed while generating (a deterministic backend error on this input:
    the same request fails the same way)."""


class ConstraintError(InvalidPromptError):
    """The output constraint (a grammar or JSON schema) cannot be compiled for this model, or
    this runtime cannot constrain its decoding at all."""


class CapabilityNotSupported(InvalidPromptError):
    """The loaded model cannot do what was asked (e.g. embeddings from a chat-only runtime)."""

    def __init__(self, model_id: str, capability: Capability) -> None:
        self.capability = capability
        super().__init__(f"model {model_id!r} does not support {capability.value}")


# --- values ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RuntimeDescription:
    """What is loaded and how, for /v1/models, health and telemetry."""

    runtime: str  # backend name, e.g. "llama.cpp"
    model_id: str
    model_path: Path
    n_ctx: int  # context window in tokens
    n_threads: int  # CPU threads used for decoding
    gpu_offload: bool
    format: int  # a fleet.v1.ModelFormat value
    capabilities: frozenset[Capability] = GENERATIVE
    device: str = "cpu"  # where it runs: "cpu", "cuda", "metal", or an ONNX Runtime provider name
    vocab_size: int | None = None  # token ids are below this (logit_bias keys are checked against it)
    constrained_decoding: bool = False  # honours SamplingParams.constraint (see runtimes.constraints)


@dataclass(frozen=True, slots=True)
class ChatMessage:
    """One chat turn, already reduced to plain text; ``name`` tells participants of one role
    apart (OpenAI's message name), passed to the chat template, which may use it or not."""

    role: str
    content: str
    name: str | None = None


@dataclass(frozen=True, slots=True)
class Constraint:
    """A grammar every generated token must keep the output inside (structured output, forced
    tool calls). ``grammar`` is in llguidance's serialized form (runtimes.constraints builds it);
    a runtime without ``constrained_decoding`` must never be handed one."""

    grammar: str


MAX_LORA_SCALE = 8.0  # a per-request LoRA scale beyond this is refused (trained adapters use ~0..2)


@dataclass(frozen=True, slots=True)
class LoraRequest:
    """Generate with the LoRA adapter loaded under ``name`` (see `edgefleet.agent.runtimes.lora`),
    its low-rank product multiplied by ``scale`` (1: as trained; 0: the base model alone)."""

    name: str
    scale: float = 1.0


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """How to sample; defaults follow the OpenAI API so an omitted field means the same thing."""

    max_tokens: int | None = None  # None: until the end of the context window
    temperature: float = 1.0  # 0 selects greedy decoding
    top_p: float = 1.0
    top_k: int = 0  # 0: no top-k cut (an extension field, as in vLLM and llama.cpp's server)
    seed: int | None = None  # None: a fresh random seed per request
    stop: tuple[str, ...] = ()
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    logprobs: int | None = None  # None: none; k >= 0: each token's logprob and its k likeliest rivals
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias added to its logit)
    constraint: Constraint | None = None  # None: unconstrained decoding
    lora: LoraRequest | None = None  # None: the base model alone


@dataclass(frozen=True, slots=True)
class TopLogprob:
    """One candidate token at a position: its bytes and log probability."""

    token: bytes
    logprob: float


@dataclass(frozen=True, slots=True)
class TokenLogprob:
    """A generated token's bytes and log probability under the model (before any logit_bias,
    penalty or truncation), with the likeliest candidates at its position, best first."""

    token: bytes
    logprob: float
    top: tuple[TopLogprob, ...] = ()


@dataclass(frozen=True, slots=True)
class Delta:
    """A piece of generated text; the last delta of a generation carries the finish reason."""

    text: str
    finish_reason: FinishReason | None = None
    # With SamplingParams.logprobs: the tokens this delta's text came from (None: not asked).
    # A delta may carry tokens whose text is still held back, or text from earlier tokens.
    logprobs: tuple[TokenLogprob, ...] | None = None
    index: int = 0  # which choice it belongs to, when a request asks for several (n > 1)


@dataclass(frozen=True, slots=True)
class Completion:
    """A finished, non-streamed generation with its token counts."""

    text: str
    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    logprobs: tuple[TokenLogprob, ...] | None = None  # with SamplingParams.logprobs
    # With n > 1: choices 1..n-1 (this one is choice 0; completion_tokens counts them all).
    further_choices: tuple[Completion, ...] = ()


@dataclass(frozen=True, slots=True)
class Embeddings:
    """One vector per input text, in input order, with the tokens the inputs took."""

    vectors: tuple[tuple[float, ...], ...]
    prompt_tokens: int


class Generation(Protocol):
    """A generation in progress: iterate for deltas, close to stop early.

    Creating one has already validated the prompt (so context-length errors surface before
    any token is produced); iterating does the work. Tokens are only computed when the
    consumer asks for the next delta, so closing stops generation within one token.
    One consumer thread only.
    """

    @property
    def prompt_tokens(self) -> int: ...

    @property
    def completion_tokens(self) -> int:
        """Tokens generated so far (final once iteration ended)."""
        ...

    def __iter__(self) -> Iterator[Delta]: ...

    def __next__(self) -> Delta: ...

    def close(self) -> None: ...


class Runtime(Protocol):
    """A loaded model. Loading happens in the adapter's factory, so a Runtime is always usable
    until `unload()`; implementations serialize generations themselves."""

    def describe(self) -> RuntimeDescription: ...

    def chat(self, messages: Sequence[ChatMessage], params: SamplingParams) -> Completion: ...

    def chat_stream(self, messages: Sequence[ChatMessage], params: SamplingParams) -> Generation: ...

    def complete(self, prompt: str, params: SamplingParams) -> Completion: ...

    def complete_stream(self, prompt: str, params: SamplingParams) -> Generation: ...

    def embed(self, texts: Sequence[str]) -> Embeddings:
        """Raises CapabilityNotSupported unless EMBEDDINGS is in the description's capabilities."""
        ...

    def smoke_test(self) -> None:
        """Run a tiny real generation (or embedding, for an encoder); raise RuntimeSmokeTestError
        if it fails or is empty."""
        ...

    def unload(self) -> None:
        """Free the model; waits for the generation in progress. Idempotent."""
        ...


# --- helpers -----------------------------------------------------------------------------


def collect(generation: Generation) -> Completion:
    """Drain a generation into a Completion, so adapters need only one generation path."""
    parts: list[str] = []
    finish: FinishReason = "length"
    logprobs: list[TokenLogprob] | None = None
    try:
        for delta in generation:
            parts.append(delta.text)
            if delta.logprobs is not None:
                logprobs = [] if logprobs is None else logprobs
                logprobs.extend(delta.logprobs)
            if delta.finish_reason is not None:
                finish = delta.finish_reason
    finally:
        generation.close()
    return Completion(
        text="".join(parts),
        finish_reason=finish,
        prompt_tokens=generation.prompt_tokens,
        completion_tokens=generation.completion_tokens,
        logprobs=None if logprobs is None else tuple(logprobs),
    )


def require_support(description: RuntimeDescription, params: SamplingParams) -> None:
    """Refuse sampling options the runtime cannot honour, naming the field (never ignore one)."""
    where = f"the {description.runtime} runtime serving {description.model_id!r}"
    if params.logprobs is not None and Capability.LOGPROBS not in description.capabilities:
        raise FieldNotSupported("logprobs", f"{where} computes no token log probabilities; omit logprobs")
    if params.logit_bias and Capability.LOGIT_BIAS not in description.capabilities:
        raise FieldNotSupported("logit_bias", f"{where} cannot bias token logits; omit logit_bias")
    if params.lora is not None:
        if Capability.LORA not in description.capabilities:
            raise FieldNotSupported("lora", f"{where} cannot apply LoRA adapters")
        if not math.isfinite(params.lora.scale) or abs(params.lora.scale) > MAX_LORA_SCALE:
            raise FieldNotSupported("lora", f"a LoRA scale must be finite and within +-{MAX_LORA_SCALE:g}")
    limit = description.vocab_size
    for token, _ in params.logit_bias:
        if token < 0 or (limit is not None and token >= limit):
            bound = f" (0..{limit - 1})" if limit is not None else ""
            raise FieldNotSupported("logit_bias", f"token id {token} is not in the model's vocabulary{bound}")


SMOKE_PARAMS = SamplingParams(max_tokens=8, temperature=0.0, seed=0)


def smoke_generate(runtime: Runtime, *, chat: bool) -> None:
    """A tiny greedy generation, through the chat template when the model has one: what every
    generative adapter's smoke test is, so a broken model is caught before it serves."""
    try:
        if chat:
            result = runtime.chat([ChatMessage(role="user", content="Say hello.")], SMOKE_PARAMS)
        else:
            result = runtime.complete("Hello", SMOKE_PARAMS)
    except RuntimeFailure as exc:
        raise RuntimeSmokeTestError(f"smoke generation failed: {exc}") from exc
    if result.completion_tokens == 0 or not result.text.strip():
        raise RuntimeSmokeTestError("smoke generation produced no text")


def format_name(fmt: int) -> str:
    """The enum name of a ModelFormat value, or the bare number if the contract doesn't know it."""
    try:
        return common_pb2.ModelFormat.Name(fmt)
    except ValueError:
        return f"#{fmt}"


@runtime_checkable
class PushingGeneration(Protocol):
    """A generation that can drive itself, handing each delta to a callback on its backend's
    own thread (SlotGeneration on llama.cpp): no thread hand-off per token. The consumer
    thread blocks in ``stream_to`` until the end, or until ``cancelled`` is set."""

    def stream_to(self, emit: Callable[[Delta], None], cancelled: threading.Event) -> None: ...


@runtime_checkable
class TokenizingRuntime(Protocol):
    """A runtime that exposes its tokenizer (POST /tokenize and /detokenize)."""

    def tokenize(self, text: str, *, add_special: bool) -> list[int]:
        """The token ids of ``text`` as a completion prompt would have them (with ``add_special``,
        the BOS/EOS the model adds itself); special-token text in it is matched as such."""
        ...

    def detokenize(self, tokens: Sequence[int]) -> str:
        """The text of ``tokens`` (raises FieldNotSupported("tokens", ...) for an unknown id)."""
        ...
