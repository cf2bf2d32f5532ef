"""POST /v1/chat/completions: messages through the model's chat template."""

from __future__ import annotations

import copy
import dataclasses

from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response

from edgefleet.agent.api.chat_plan import ChatPlan
from edgefleet.agent.api.choices import for_choice, open_choices
from edgefleet.agent.api.errors import APIError
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
from edgefleet.agent.api.protocol_logprobs import chat_logprobs
from edgefleet.agent.api.serving_base import OpenAIServing
from edgefleet.agent.runtimes.base import (
    Capability,
    ChatMessage,
    Completion,
    ConstraintError,
    Delta,
    FieldNotSupported,
    Generation,
    LoraRequest,
    Runtime,
    TokenLogprob,
    require_support,
)
from edgefleet.agent.runtimes.model_table import ADAPTER_SEPARATOR


class ServingChat(OpenAIServing[ChatCompletionRequest]):
    endpoint = "chat.completions"
    capability = Capability.CHAT
    capability_name = "chat completions"
    id_prefix = "chatcmpl"
    prompt_param = "messages"
    plan: ChatPlan | None = None  # set on the per-request copy `handle` makes
    announced = 0  # the last choice whose role chunk was sent (n > 1), on the per-request copy

    async def handle(self, request: ChatCompletionRequest, raw: Request) -> Response:
        """Tools and response_format are planned (and refused, naming the field) before the
        request queues; the plan rides on a shallow copy of this endpoint, one per request,
        since the stream's tool-call parser keeps state between chunks."""
        try:
            plan = await run_in_threadpool(ChatPlan.of, request)
            base = request.model.partition(ADAPTER_SEPARATOR)[0]  # an adapter uses its model's template
            runtime = self._models.get(request.model) or self._models.get(base)
            if runtime is not None:  # may read the model's template and compile a grammar
                await run_in_threadpool(plan.check_runtime, runtime.describe())
        except APIError as refused:
            self.rejected(refused, model=request.model)
            raise
        per_request = copy.copy(self)
        per_request.plan = plan
        return await super(ServingChat, per_request).handle(request, raw)

    def check_size(self, limits: RequestLimits, request: ChatCompletionRequest) -> None:
        limits.check_count(
            "messages", len(request.messages), limit=limits.max_messages, setting="max_messages"
        )
        limits.check_chars("messages", (message.text() for message in request.messages))

    def open_generation(
        self, runtime: Runtime, request: ChatCompletionRequest, lora: LoraRequest | None
    ) -> Generation:
        messages = [
            ChatMessage(role=m.template_role(), content=m.text(), name=m.participant())
            for m in request.messages
        ]
        params = self.sampling_params(
            request, max_tokens=request.token_limit(), logprobs=request.logprobs_wanted(), lora=lora
        )
        require_support(runtime.describe(), params)  # logprobs, logit_bias: a 400 naming them
        if self.plan is not None:
            try:  # checked in `handle` already, unless the model was swapped since
                self.plan.check_runtime(runtime.describe())
            except APIError as exc:
                raise ConstraintError(str(exc)) from exc
            messages = self.plan.messages
            params = dataclasses.replace(params, constraint=self.plan.constraint)
            if request.n > 1 and self.plan.tool_names:
                raise FieldNotSupported("n", "n > 1 together with tools is not supported")
        return open_choices(lambda index: runtime.chat_stream(messages, for_choice(params, index)), request.n)

    def build_response(self, *, request_id: str, model: str, completion: Completion) -> BaseModel:
        if self.plan is not None and self.plan.tool_names:
            message, finish = self.plan.reply(completion)
            return ChatCompletionResponse(
                id=request_id,
                model=model,
                choices=[ChatCompletionChoice(message=message, finish_reason=finish)],
                usage=UsageInfo.of(
                    prompt_tokens=completion.prompt_tokens, completion_tokens=completion.completion_tokens
                ),
            )
        return ChatCompletionResponse(
            id=request_id,
            model=model,
            choices=[
                ChatCompletionChoice(
                    index=index,
                    message=ChatResponseMessage(content=choice.text),
                    finish_reason=choice.finish_reason,
                    logprobs=chat_logprobs(choice.logprobs),
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
        def chunk(
            message: DeltaMessage,
            finish: Delta | None = None,
            logprobs: tuple[TokenLogprob, ...] | None = None,
        ) -> ChatCompletionChunk:
            choice = ChatCompletionChunkChoice(
                index=delta.index,
                delta=message,
                finish_reason=None if finish is None else finish.finish_reason,
                logprobs=chat_logprobs(logprobs),
            )
            return ChatCompletionChunk(id=request_id, created=created, model=model, choices=[choice])

        chunks: list[BaseModel] = []
        if first or delta.index > self.announced:  # OpenAI opens every choice by announcing the role
            self.announced = delta.index
            chunks.append(chunk(DeltaMessage(role="assistant", content="")))
        if self.plan is not None and self.plan.tool_names:  # content and tool-call fragments
            for message, finish in self.plan.stream(delta):
                choice = ChatCompletionChunkChoice(delta=message, finish_reason=finish)
                chunks.append(
                    ChatCompletionChunk(id=request_id, created=created, model=model, choices=[choice])
                )
            return chunks
        if delta.text:
            chunks.append(chunk(DeltaMessage(content=delta.text), logprobs=delta.logprobs))
        if delta.finish_reason is not None:  # tokens whose text was held back and dropped come here
            held_back = None if delta.text else delta.logprobs
            chunks.append(chunk(DeltaMessage(), finish=delta, logprobs=held_back))
        return chunks

    def build_usage_chunk(self, *, request_id: str, created: int, model: str, usage: UsageInfo) -> BaseModel:
        return ChatCompletionChunk(id=request_id, created=created, model=model, choices=[], usage=usage)
