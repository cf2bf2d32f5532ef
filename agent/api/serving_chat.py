"""POST /v1/chat/completions: messages through the model's chat template."""

from __future__ import annotations

from pydantic import BaseModel

from edgefleet.agent.api.limits import RequestLimits
from edgefleet.agent.api.protocol import (
    ChatCompletionChoice,
    ChatCompletionChunk,
    ChatCompletionChunkChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatResponseMessage,
    DeltaMessage,
    UsageInfo,
)
from edgefleet.agent.api.serving_base import OpenAIServing
from edgefleet.agent.runtimes.base import Capability, ChatMessage, Completion, Delta, Generation, Runtime


class ServingChat(OpenAIServing[ChatCompletionRequest]):
    endpoint = "chat.completions"
    capability = Capability.CHAT
    capability_name = "chat completions"
    id_prefix = "chatcmpl"
    prompt_param = "messages"

    def check_size(self, limits: RequestLimits, request: ChatCompletionRequest) -> None:
        limits.check_count(
            "messages", len(request.messages), limit=limits.max_messages, setting="max_messages"
        )
        limits.check_chars("messages", (message.text() for message in request.messages))

    def open_generation(self, runtime: Runtime, request: ChatCompletionRequest) -> Generation:
        messages = [ChatMessage(role=m.template_role(), content=m.text()) for m in request.messages]
        params = self.sampling_params(request, max_tokens=request.token_limit())
        return runtime.chat_stream(messages, params)

    def build_response(self, *, request_id: str, model: str, completion: Completion) -> BaseModel:
        return ChatCompletionResponse(
            id=request_id,
            model=model,
            choices=[
                ChatCompletionChoice(
                    message=ChatResponseMessage(content=completion.text),
                    finish_reason=completion.finish_reason,
                )
            ],
            usage=UsageInfo.of(
                prompt_tokens=completion.prompt_tokens, completion_tokens=completion.completion_tokens
            ),
        )

    def build_chunks(
        self, *, request_id: str, created: int, model: str, delta: Delta, first: bool
    ) -> list[BaseModel]:
        def chunk(message: DeltaMessage, finish: Delta | None = None) -> ChatCompletionChunk:
            choice = ChatCompletionChunkChoice(
                delta=message, finish_reason=None if finish is None else finish.finish_reason
            )
            return ChatCompletionChunk(id=request_id, created=created, model=model, choices=[choice])

        chunks: list[BaseModel] = []
        if first:  # OpenAI opens every stream by announcing the role
            chunks.append(chunk(DeltaMessage(role="assistant", content="")))
        if delta.text:
            chunks.append(chunk(DeltaMessage(content=delta.text)))
        if delta.finish_reason is not None:
            chunks.append(chunk(DeltaMessage(), finish=delta))
        return chunks

    def build_usage_chunk(self, *, request_id: str, created: int, model: str, usage: UsageInfo) -> BaseModel:
        return ChatCompletionChunk(id=request_id, created=created, model=model, choices=[], usage=usage)
