"""POST /v1/responses: OpenAI's Responses API over the chat path, stateless.

A Responses request is turned into the chat request it means (instructions as the system
message, input items as turns, function tools, ``text.format`` as ``response_format``) and
served by the chat machinery: the same template, limits, admission, tool-call format and
constrained decoding. Only the reply's shape differs: a ``response`` object with ``message``
and ``function_call`` output items, or, streamed, OpenAI's ``response.*`` events, ending with
``response.completed`` (``response.incomplete`` when the token limit cut the reply) that
carries the usage.
"""

from __future__ import annotations

import copy
import json
import uuid
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ValidationError
from starlette.requests import Request
from starlette.responses import Response

from edgefleet.agent.api.errors import APIError
from edgefleet.agent.api.protocol import ChatCompletionRequest, ChatFinishReason, UsageInfo
from edgefleet.agent.api.protocol_responses import (
    FunctionCallItem,
    IncompleteDetails,
    OutputItem,
    OutputMessage,
    OutputText,
    ResponseEvent,
    ResponseObject,
    ResponsesRequest,
    ResponseUsage,
)
from edgefleet.agent.api.serving_chat import ServingChat
from edgefleet.agent.runtimes.base import Completion, Delta

Status = Literal["in_progress", "completed", "incomplete"]
_PARAMS = {"response_format": "text.format", "messages": "input"}  # chat field -> Responses field


def chat_request(request: ResponsesRequest) -> ChatCompletionRequest:
    """The chat request a Responses request stands for (raises APIError if it cannot be one)."""
    messages: list[dict[str, Any]] = []
    if request.instructions:
        messages.append({"role": "system", "content": request.instructions})
    if isinstance(request.input, str):
        messages.append({"role": "user", "content": request.input})
    else:
        for item in request.input:
            kind = item.type or "message"
            if kind == "function_call":
                call = {
                    "id": item.call_id,
                    "type": "function",
                    "function": {"name": item.name, "arguments": item.arguments},
                }
                last = messages[-1] if messages else None
                if last is not None and last["role"] == "assistant" and "tool_calls" in last:
                    last["tool_calls"].append(call)
                else:
                    messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
            elif kind == "function_call_output":
                messages.append({"role": "tool", "tool_call_id": item.call_id, "content": item.output})
            else:
                messages.append({"role": item.role, "content": item.text()})
    chat: dict[str, Any] = {"model": request.model, "messages": messages, "stream": request.stream}
    if request.stream:
        chat["stream_options"] = {"include_usage": True}  # the usage rides on response.completed
    for name in ("temperature", "top_p", "parallel_tool_calls", "user"):
        if getattr(request, name) is not None:
            chat[name] = getattr(request, name)
    if request.max_output_tokens is not None:
        chat["max_completion_tokens"] = request.max_output_tokens
    if request.tools:
        chat["tools"] = [
            {"type": "function", "function": tool.model_dump(exclude={"type"}, exclude_none=True)}
            for tool in request.tools
        ]
    if isinstance(request.tool_choice, str):
        chat["tool_choice"] = request.tool_choice
    elif request.tool_choice is not None:
        chat["tool_choice"] = {"type": "function", "function": {"name": request.tool_choice.name}}
    fmt = request.text.format if request.text is not None else None
    if fmt is not None and fmt.type == "json_object":
        chat["response_format"] = {"type": "json_object"}
    elif fmt is not None and fmt.type == "json_schema":
        spec = {"name": fmt.name, "schema": fmt.schema_, "strict": fmt.strict, "description": fmt.description}
        chat["response_format"] = {
            "type": "json_schema",
            "json_schema": {key: value for key, value in spec.items() if value is not None},
        }
    try:
        return ChatCompletionRequest.model_validate_json(json.dumps(chat))
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first.get("loc", ()))
        raise APIError(
            400, f"input: {where}: {first.get('msg', 'invalid')}", param="input", code="invalid_value"
        ) from exc


@dataclass(slots=True)
class _Stream:
    """A streamed response's progress: its items and which one is open."""

    sequence: int = 0
    items: list[OutputItem] = field(default_factory=list)
    open_message: OutputMessage | None = None
    open_call: FunctionCallItem | None = None
    finish: ChatFinishReason = "stop"


class ServingResponses(ServingChat):
    endpoint = "responses"
    capability_name = "responses"
    id_prefix = "resp"
    prompt_param = "messages"
    origin: ResponsesRequest | None = None
    progress: _Stream | None = None

    async def respond(self, request: ResponsesRequest, raw: Request) -> Response:
        try:
            chat = chat_request(request)
        except APIError as refused:
            self.rejected(refused, model=request.model)
            raise
        per_request = copy.copy(self)
        per_request.origin = request
        per_request.progress = _Stream()
        try:
            return await per_request.handle(chat, raw)
        except APIError as exc:
            param = exc.info.param
            if param not in _PARAMS:
                raise
            message = exc.info.message.replace(f"{param}:", f"{_PARAMS[param]}:", 1)
            raise APIError(
                exc.status, message, type=exc.info.type, code=exc.info.code, param=_PARAMS[param]
            ) from exc

    def _new_id(self) -> str:
        return f"resp_{uuid.uuid4().hex}"

    def _response(
        self,
        *,
        request_id: str,
        model: str,
        status: Status,
        output: list[OutputItem],
        usage: UsageInfo | None,
    ) -> ResponseObject:
        origin = self.origin
        assert origin is not None
        fmt = origin.text.format if origin.text is not None else None
        return ResponseObject(
            id=request_id,
            status=status,
            model=model,
            output=output,
            instructions=origin.instructions,
            tools=[tool.model_dump(exclude_none=True) for tool in origin.tools or []],
            tool_choice=(
                origin.tool_choice
                if isinstance(origin.tool_choice, str)
                else origin.tool_choice.model_dump()
                if origin.tool_choice is not None
                else "auto"
            ),
            parallel_tool_calls=origin.parallel_tool_calls is not False,
            text={"format": fmt.model_dump(by_alias=True, exclude_none=True) if fmt else {"type": "text"}},
            temperature=origin.temperature,
            top_p=origin.top_p,
            max_output_tokens=origin.max_output_tokens,
            metadata=origin.metadata or {},
            incomplete_details=IncompleteDetails(reason="max_output_tokens")
            if status == "incomplete"
            else None,
            usage=None
            if usage is None
            else ResponseUsage(
                input_tokens=usage.prompt_tokens,
                output_tokens=usage.completion_tokens,
                total_tokens=usage.total_tokens,
            ),
        )

    def build_response(self, *, request_id: str, model: str, completion: Completion) -> BaseModel:
        assert self.plan is not None
        message, finish = self.plan.reply(completion)
        status: Status = "incomplete" if finish == "length" else "completed"
        output: list[OutputItem] = []
        if message.content is not None or not message.tool_calls:
            output.append(
                OutputMessage(
                    id=_item_id("msg"), status=status, content=[OutputText(text=message.content or "")]
                )
            )
        for call in message.tool_calls or []:
            output.append(
                FunctionCallItem(
                    id=_item_id("fc"),
                    call_id=call.id,
                    name=call.function.name,
                    arguments=call.function.arguments,
                    status="completed",
                )
            )
        usage = UsageInfo.of(
            prompt_tokens=completion.prompt_tokens, completion_tokens=completion.completion_tokens
        )
        return self._response(request_id=request_id, model=model, status=status, output=output, usage=usage)

    def build_chunks(
        self, *, request_id: str, created: int, model: str, delta: Delta, first: bool
    ) -> list[BaseModel]:
        assert self.plan is not None and self.progress is not None
        state = self.progress
        events: list[BaseModel] = []

        def emit(kind: str, **fields: Any) -> None:
            events.append(ResponseEvent(type=kind, sequence_number=state.sequence, **fields))
            state.sequence += 1

        if first:
            started = self._response(
                request_id=request_id, model=model, status="in_progress", output=[], usage=None
            )
            emit("response.created", response=started)
            emit("response.in_progress", response=started)
        for message, finish in self.plan.stream(delta):
            if message.content:
                if state.open_message is None:
                    self._close_call(emit)
                    item = OutputMessage(id=_item_id("msg"), status="in_progress", content=[])
                    state.open_message = item
                    emit("response.output_item.added", output_index=len(state.items), item=item)
                    emit(
                        "response.content_part.added",
                        item_id=item.id,
                        output_index=len(state.items),
                        content_index=0,
                        part=OutputText(text=""),
                    )
                    item.content.append(OutputText(text=""))
                open_message = state.open_message
                open_message.content[0].text += message.content
                emit(
                    "response.output_text.delta",
                    item_id=open_message.id,
                    output_index=len(state.items),
                    content_index=0,
                    delta=message.content,
                    logprobs=[],
                )
            for call in message.tool_calls or []:
                if call.id is not None:
                    self._close_message(emit, status="completed")
                    self._close_call(emit)
                    name = call.function.name if call.function is not None else None
                    opened = FunctionCallItem(
                        id=_item_id("fc"),
                        call_id=call.id,
                        name=name or "",
                        arguments="",
                        status="in_progress",
                    )
                    state.open_call = opened
                    emit("response.output_item.added", output_index=len(state.items), item=opened)
                elif state.open_call is not None and call.function is not None and call.function.arguments:
                    state.open_call.arguments += call.function.arguments
                    emit(
                        "response.function_call_arguments.delta",
                        item_id=state.open_call.id,
                        output_index=len(state.items),
                        delta=call.function.arguments,
                    )
            if finish is not None:
                state.finish = finish
                self._close_message(emit, status="incomplete" if finish == "length" else "completed")
                self._close_call(emit)
        return events

    def _close_message(self, emit: Any, *, status: Status) -> None:
        state = self.progress
        assert state is not None
        item = state.open_message
        if item is None:
            return
        index = len(state.items)
        text = item.content[0].text
        emit(
            "response.output_text.done",
            item_id=item.id,
            output_index=index,
            content_index=0,
            text=text,
            logprobs=[],
        )
        emit(
            "response.content_part.done",
            item_id=item.id,
            output_index=index,
            content_index=0,
            part=OutputText(text=text),
        )
        item.status = status
        emit("response.output_item.done", output_index=index, item=item)
        state.items.append(item)
        state.open_message = None

    def _close_call(self, emit: Any) -> None:
        state = self.progress
        assert state is not None
        item = state.open_call
        if item is None:
            return
        index = len(state.items)
        emit(
            "response.function_call_arguments.done",
            item_id=item.id,
            output_index=index,
            arguments=item.arguments,
        )
        item.status = "completed"
        emit("response.output_item.done", output_index=index, item=item)
        state.items.append(item)
        state.open_call = None

    def build_usage_chunk(self, *, request_id: str, created: int, model: str, usage: UsageInfo) -> BaseModel:
        state = self.progress
        assert state is not None
        status: Status = "incomplete" if state.finish == "length" else "completed"
        final = self._response(
            request_id=request_id, model=model, status=status, output=state.items, usage=usage
        )
        event = ResponseEvent(type=f"response.{status}", sequence_number=state.sequence, response=final)
        state.sequence += 1
        return event


def _item_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"
