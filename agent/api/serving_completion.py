"""POST /v1/completions: raw text in, continuation out (the only mode for base models).

``echo`` puts the prompt ahead of the completion (streamed: as the first chunk of each
choice); ``logprobs`` adds OpenAI's completion logprobs, whose ``text_offset`` counts on across
the chunks of a stream, so each request gets its own copy of this endpoint to keep that count
(one per choice, with n > 1: see edgefleet.agent.api.choices).
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Callable, Iterator

from pydantic import BaseModel
from starlette.requests import Request
from starlette.responses import Response

from edgefleet.agent.api.choices import for_choice, open_choices
from edgefleet.agent.api.limits import RequestLimits
from edgefleet.agent.api.protocol import CompletionChoice, CompletionRequest, CompletionResponse, UsageInfo
from edgefleet.agent.api.protocol_logprobs import CompletionOffsets
from edgefleet.agent.api.serving_base import OpenAIServing
from edgefleet.agent.runtimes.base import (
    Capability,
    Completion,
    Delta,
    Generation,
    LoraRequest,
    PushingGeneration,
    Runtime,
    require_support,
)


class ServingCompletion(OpenAIServing[CompletionRequest]):
    endpoint = "completions"
    capability = Capability.COMPLETIONS
    capability_name = "text completions"
    id_prefix = "cmpl"
    prompt_param = "prompt"
    offsets: dict[int, CompletionOffsets] | None = None  # per choice, on the per-request copy

    async def handle(self, request: CompletionRequest, raw: Request) -> Response:
        per_request = copy.copy(self)
        per_request.offsets = {}
        return await super(ServingCompletion, per_request).handle(request, raw)

    def check_size(self, limits: RequestLimits, request: CompletionRequest) -> None:
        limits.check_chars("prompt", [request.prompt_text()])

    def open_generation(
        self, runtime: Runtime, request: CompletionRequest, lora: LoraRequest | None
    ) -> Generation:
        params = self.sampling_params(
            request, max_tokens=request.max_tokens, logprobs=request.logprobs, lora=lora
        )
        require_support(runtime.describe(), params)
        prompt = request.prompt_text()

        def open_choice(index: int) -> Generation:
            generation = runtime.complete_stream(prompt, for_choice(params, index))
            return EchoGeneration(prompt, generation) if request.echo else generation

        return open_choices(open_choice, request.n)

    def build_response(self, *, request_id: str, model: str, completion: Completion) -> BaseModel:
        return CompletionResponse(
            id=request_id,
            model=model,
            choices=[
                CompletionChoice(
                    index=index,
                    text=choice.text,
                    finish_reason=choice.finish_reason,
                    logprobs=None if choice.logprobs is None else CompletionOffsets(0).build(choice.logprobs),
                )
                for index, choice in enumerate((completion, *completion.further_choices))
            ],
            usage=UsageInfo.of(
                prompt_tokens=completion.prompt_tokens, completion_tokens=completion.completion_tokens
            ),
        )

    def build_chunks(
        self, *, request_id: str, created: int, model: str, delta: Delta, first: bool
    ) -> list[BaseModel]:
        if not delta.text and delta.finish_reason is None and not delta.logprobs:
            return []
        logprobs = None
        if delta.logprobs is not None:
            offsets = (
                self.offsets.setdefault(delta.index, CompletionOffsets(0))
                if self.offsets is not None
                else None
            )
            logprobs = (offsets or CompletionOffsets(0)).build(delta.logprobs)
        choice = CompletionChoice(
            index=delta.index, text=delta.text, finish_reason=delta.finish_reason, logprobs=logprobs
        )
        return [CompletionResponse(id=request_id, created=created, model=model, choices=[choice])]

    def build_usage_chunk(self, *, request_id: str, created: int, model: str, usage: UsageInfo) -> BaseModel:
        return CompletionResponse(id=request_id, created=created, model=model, choices=[], usage=usage)


class EchoGeneration:
    """A generation whose first delta is the prompt itself (``echo``); otherwise the inner one.
    Pushes its deltas when the inner generation can, so echo keeps the fast streaming path."""

    def __init__(self, prompt: str, inner: Generation) -> None:
        self._prompt: str | None = prompt
        self._inner = inner

    @property
    def prompt_tokens(self) -> int:
        return self._inner.prompt_tokens

    @property
    def completion_tokens(self) -> int:
        return self._inner.completion_tokens

    def __iter__(self) -> Iterator[Delta]:
        return self

    def __next__(self) -> Delta:
        if self._prompt is not None:
            prompt, self._prompt = self._prompt, None
            return Delta(prompt)
        return next(self._inner)

    def stream_to(self, emit: Callable[[Delta], None], cancelled: threading.Event) -> None:
        if self._prompt is not None:
            emit(next(self))
        if isinstance(self._inner, PushingGeneration):
            self._inner.stream_to(emit, cancelled)
            return
        while not cancelled.is_set():
            try:
                delta = next(self._inner)
            except StopIteration:
                return
            emit(delta)

    def close(self) -> None:
        self._inner.close()
