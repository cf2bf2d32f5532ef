"""POST /v1/completions: raw text in, continuation out (the only mode for base models)."""

from __future__ import annotations

from pydantic import BaseModel

from edgefleet.agent.api.limits import RequestLimits
from edgefleet.agent.api.protocol import CompletionChoice, CompletionRequest, CompletionResponse, UsageInfo
from edgefleet.agent.api.serving_base import OpenAIServing
from edgefleet.agent.runtimes.base import Capability, Completion, Delta, Generation, Runtime


class ServingCompletion(OpenAIServing[CompletionRequest]):
    endpoint = "completions"
    capability = Capability.COMPLETIONS
    capability_name = "text completions"
    id_prefix = "cmpl"
    prompt_param = "prompt"

    def check_size(self, limits: RequestLimits, request: CompletionRequest) -> None:
        limits.check_chars("prompt", [request.prompt_text()])

    def open_generation(self, runtime: Runtime, request: CompletionRequest) -> Generation:
        params = self.sampling_params(request, max_tokens=request.max_tokens)
        return runtime.complete_stream(request.prompt_text(), params)

    def build_response(self, *, request_id: str, model: str, completion: Completion) -> BaseModel:
        return CompletionResponse(
            id=request_id,
            model=model,
            choices=[CompletionChoice(text=completion.text, finish_reason=completion.finish_reason)],
            usage=UsageInfo.of(
                prompt_tokens=completion.prompt_tokens, completion_tokens=completion.completion_tokens
            ),
        )

    def build_chunks(
        self, *, request_id: str, created: int, model: str, delta: Delta, first: bool
    ) -> list[BaseModel]:
        if not delta.text and delta.finish_reason is None:
            return []
        choice = CompletionChoice(text=delta.text, finish_reason=delta.finish_reason)
        return [CompletionResponse(id=request_id, created=created, model=model, choices=[choice])]

    def build_usage_chunk(self, *, request_id: str, created: int, model: str, usage: UsageInfo) -> BaseModel:
        return CompletionResponse(id=request_id, created=created, model=model, choices=[], usage=usage)
