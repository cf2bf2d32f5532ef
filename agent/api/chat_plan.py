"""One chat request's tools and structured output, worked out before the model is asked.

`ChatPlan.of` turns `tools`, `tool_choice`, `parallel_tool_calls`, `response_format` and the
tool turns of the history into what the runtime takes (plain chat messages, one grammar) and
refuses, naming the field, what cannot be honoured: a choice naming no listed tool, a schema
too large or deep, one the grammar engine cannot compile. A plan also shapes the reply:
generated text becomes `content` and `tool_calls`, whole or as stream fragments, through one
`ToolCallParser` per request. Without tools or a response format the plan is a no-op.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgefleet.agent.api.errors import APIError
from edgefleet.agent.api.gguf_template import model_template
from edgefleet.agent.api.protocol import (
    ChatCompletionRequest,
    ChatFinishReason,
    ChatMessageParam,
    ChatResponseMessage,
    DeltaMessage,
)
from edgefleet.agent.api.protocol_tools import (
    ResponseFormatGrammar,
    ResponseFormatJSONObject,
    ResponseFormatJSONSchema,
    ToolCall,
    ToolCallDelta,
    ToolCallFunction,
    ToolCallFunctionDelta,
    ToolParam,
)
from edgefleet.agent.api.tool_calls import (
    ArgumentsPiece,
    CallStart,
    Event,
    ToolCallParser,
    call_schema,
    calls_lark,
    render_calls,
    render_result,
    tools_prompt,
)
from edgefleet.agent.api.tool_formats import (
    HERMES,
    ToolFormat,
    ToolTextError,
    format_lark,
    render_segments,
    template_format,
)
from edgefleet.agent.runtimes.base import (
    ChatMessage,
    Completion,
    Constraint,
    ConstraintError,
    Delta,
    FinishReason,
    InvalidPromptError,
    RuntimeDescription,
)
from edgefleet.agent.runtimes.constraints import json_schema_grammar, lark_grammar
from edgefleet.agent.runtimes.prompt import RenderedChat

MAX_PARALLEL_CALLS = 4  # calls one reply may make when parallel_tool_calls allows several


# Error codes of refusals no JSON schema can state (so the API's schema cannot either).
INVALID_SCHEMA = "invalid_schema"  # a schema or grammar the engine cannot compile, or too large
INVALID_TOOLS = "invalid_tools"  # tool_choice naming no listed tool, duplicate names, ...


def _refuse(message: str, param: str, code: str) -> APIError:
    return APIError(400, message, param=param, code=code)


@dataclass(frozen=True, slots=True)
class OutputFormat:
    """A response format reduced to what constrains the reply: a JSON schema (None with
    ``json`` set: any object) or a grammar text."""

    json: bool = False
    schema: dict[str, Any] | None = None
    grammar: str | None = None
    gbnf: bool = False

    @classmethod
    def of_chat(cls, value: object) -> OutputFormat | None:
        if isinstance(value, ResponseFormatJSONObject):
            return cls(json=True)
        if isinstance(value, ResponseFormatJSONSchema):
            spec = value.json_schema
            return cls(json=True, schema=spec.schema_ or {})
        if isinstance(value, ResponseFormatGrammar):
            return cls(grammar=value.grammar, gbnf=value.syntax == "gbnf")
        return None

    def compile(self, param: str) -> str:
        try:
            if self.grammar is not None:
                return lark_grammar(self.grammar, gbnf=self.gbnf)
            return json_schema_grammar(self.schema)
        except ConstraintError as exc:
            raise _refuse(f"{param}: {exc}", param, INVALID_SCHEMA) from exc


@dataclass(slots=True)
class ChatPlan:
    messages: list[ChatMessage]
    constraint: Constraint | None = None
    constraint_param: str = "response_format"  # the field a runtime that cannot constrain is refused on
    tool_names: tuple[str, ...] = ()  # non-empty: the reply is parsed for calls
    parser: ToolCallParser | None = field(default=None, repr=False)
    tool_format: ToolFormat = HERMES  # the generic format until `check_runtime` finds the model's own
    calls: CallsRequest | None = field(default=None, repr=False)  # what binding to a model needs
    bound_to: Path | None = field(default=None, repr=False)
    generic: tuple[tuple[ChatMessage, ...], Constraint | None] = field(default=((), None), repr=False)

    @classmethod
    def of(cls, request: ChatCompletionRequest) -> ChatPlan:
        """The plan of a chat request (raises APIError naming the field it refuses)."""
        return cls.build(
            messages=request.messages,
            tools=request.tools or [],
            tool_choice=request.tool_choice,
            parallel=request.parallel_tool_calls is not False,
            output=OutputFormat.of_chat(request.response_format),
        )

    @classmethod
    def build(
        cls,
        *,
        messages: Sequence[ChatMessageParam],
        tools: Sequence[ToolParam],
        tool_choice: object,
        parallel: bool,
        output: OutputFormat | None,
        format_param: str = "response_format",
    ) -> ChatPlan:
        choice = tool_choice if tool_choice is not None else ("auto" if tools else "none")
        named: str | None = None
        if not isinstance(choice, str):
            named = getattr(getattr(choice, "function", None), "name", None) or getattr(choice, "name", None)
            if named not in {tool.function.name for tool in tools}:
                message = f"tool_choice names function {named!r}, which is not in tools"
                raise _refuse(message, "tool_choice", INVALID_TOOLS)
        elif choice == "required" and not tools:
            message = "tool_choice 'required' needs at least one tool in tools"
            raise _refuse(message, "tool_choice", INVALID_TOOLS)
        if len({tool.function.name for tool in tools}) != len(tools):
            raise _refuse("tools: function names must be unique", "tools", INVALID_TOOLS)
        offered = [tool for tool in tools if named is None or tool.function.name == named]
        use_tools = bool(offered) and choice != "none"
        plan = cls(messages=_messages(messages, tools_prompt(tools) if use_tools else None))
        if use_tools:
            plan.tool_names = tuple(tool.function.name for tool in offered)
        # A named function is called once; otherwise parallel calls are bounded (see calls_lark).
        most = 1 if named is not None or not parallel else MAX_PARALLEL_CALLS
        if use_tools:
            forced = choice != "auto"
            alternative = None
            if not forced and output is not None and output.json:
                alternative = output.schema if output.schema else {"type": "object"}
            plan.calls = CallsRequest(
                messages=tuple(messages),
                tools=tuple(tools),
                offered=tuple(offered),
                most=most,
                forced=forced,
                alternative=alternative,
            )
        if use_tools and choice != "auto":  # required or named: a call is forced
            plan.constraint = Constraint(_compile_calls(offered, most=most, alternative=None))
            plan.constraint_param = "tool_choice"
        elif use_tools and output is not None and output.json:  # calls, or else the format
            alternative = output.schema if output.schema else {"type": "object"}
            plan.constraint = Constraint(_compile_calls(offered, most=most, alternative=alternative))
        elif output is not None:
            plan.constraint = Constraint(output.compile(format_param))
            plan.constraint_param = format_param
        plan.generic = (tuple(plan.messages), plan.constraint)
        return plan

    def check_runtime(self, description: RuntimeDescription) -> None:
        """Refuse a constraint the runtime would have to ignore; then, with tools, switch to
        the tool format the model's own chat template declares, if it declares one."""
        if self.constraint is not None and not description.constrained_decoding:
            raise _refuse(
                f"{self.constraint_param}: the {description.runtime} runtime serving "
                f"{description.model_id} cannot constrain its output (structured output and "
                "required or named tool choices need constrained decoding)",
                self.constraint_param,
                "constrained_decoding_not_supported",
            )
        if self.calls is not None and self.bound_to != description.model_path:
            self._bind(description.model_path)

    def _bind(self, model_path: Path) -> None:
        calls = self.calls
        assert calls is not None
        native = model_template(model_path)
        fmt = template_format(native.template if native is not None else None)
        self.bound_to = model_path
        if native is None or fmt is None:  # the generic format (again, if the model was swapped)
            self.messages, self.constraint = list(self.generic[0]), self.generic[1]
            self.tool_format = HERMES
            return
        try:
            segments = render_segments(
                native.template,
                calls.messages,
                calls.offered,
                bos_token=native.bos_token,
                eos_token=native.eos_token,
            )
        except ToolTextError as exc:
            raise _refuse(f"tools: {exc}", "tools", INVALID_TOOLS) from exc
        except InvalidPromptError as exc:
            raise _refuse(str(exc), "messages", "invalid_prompt") from exc
        text = "".join(message.text() for message in calls.messages)
        self.messages = [RenderedChat(role="user", content=text, segments=tuple(segments))]
        self.tool_format = fmt
        if calls.forced or calls.alternative is not None:
            grammar = _compile_calls(calls.offered, most=calls.most, alternative=calls.alternative, fmt=fmt)
            self.constraint = Constraint(grammar)

    # --- replies ---------------------------------------------------------------------

    def reply(self, completion: Completion) -> tuple[ChatResponseMessage, ChatFinishReason]:
        """The non-streamed message and finish reason."""
        if not self.tool_names:
            return ChatResponseMessage(content=completion.text), completion.finish_reason
        parser = ToolCallParser(self.tool_names, self.tool_format)
        parser.feed(completion.text)
        parser.finish()
        if not parser.calls:
            return ChatResponseMessage(content=completion.text), completion.finish_reason
        calls = [
            ToolCall(id=call.id, function=ToolCallFunction(name=call.name, arguments="".join(call.arguments)))
            for call in parser.calls
        ]
        if (
            completion.finish_reason == "length"
            and len(calls) > 1
            and not _is_json(calls[-1].function.arguments)
        ):
            calls.pop()  # cut off by the token limit; the complete calls before it still stand
        content = "".join(parser.content).strip() or None
        return ChatResponseMessage(content=content, tool_calls=calls), _finish(completion.finish_reason)

    def stream(self, delta: Delta) -> list[tuple[DeltaMessage, ChatFinishReason | None]]:
        """What one generated delta becomes in the stream (after the role announcement)."""
        if not self.tool_names:
            out: list[tuple[DeltaMessage, ChatFinishReason | None]] = []
            if delta.text:
                out.append((DeltaMessage(content=delta.text), None))
            if delta.finish_reason is not None:
                out.append((DeltaMessage(), delta.finish_reason))
            return out
        if self.parser is None:
            self.parser = ToolCallParser(self.tool_names, self.tool_format)
        events = self.parser.feed(delta.text)
        if delta.finish_reason is not None:
            events += self.parser.finish()
        out = [(_delta_message(event), None) for event in events]
        if delta.finish_reason is not None:
            finish = _finish(delta.finish_reason) if self.parser.calls else delta.finish_reason
            out.append((DeltaMessage(), finish))
        return out


def _is_json(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


def _finish(reason: FinishReason) -> ChatFinishReason:
    return "tool_calls" if reason == "stop" else reason


def _delta_message(event: Event) -> DeltaMessage:
    if isinstance(event, str):
        return DeltaMessage(content=event)
    if isinstance(event, CallStart):
        return DeltaMessage(
            tool_calls=[
                ToolCallDelta(
                    index=event.index,
                    id=event.id,
                    type="function",
                    function=ToolCallFunctionDelta(name=event.name, arguments=""),
                )
            ]
        )
    assert isinstance(event, ArgumentsPiece)
    return DeltaMessage(
        tool_calls=[ToolCallDelta(index=event.index, function=ToolCallFunctionDelta(arguments=event.text))]
    )


@dataclass(frozen=True, slots=True)
class CallsRequest:
    """A request's tool part as sent, kept to render it again in a model's own format."""

    messages: tuple[ChatMessageParam, ...]
    tools: tuple[ToolParam, ...]
    offered: tuple[ToolParam, ...]  # the tools a call may name (one, for a named choice)
    most: int
    forced: bool  # required or named: a call must be made
    alternative: dict[str, Any] | None  # auto with a JSON response format: calls or that JSON


def _compile_calls(
    tools: Sequence[ToolParam],
    *,
    most: int,
    alternative: dict[str, Any] | None,
    fmt: ToolFormat | None = None,
) -> str:
    param = "tools"
    try:
        if fmt is None:
            return lark_grammar(calls_lark(tools, most=most, alternative=alternative))
        bodies = [_call_schema(tool, fmt.arguments_key) for tool in tools]
        body = bodies[0] if len(bodies) == 1 else {"anyOf": bodies}
        return lark_grammar(format_lark(fmt, body, most=most, alternative=alternative))
    except ConstraintError as exc:
        raise _refuse(f"{param}: {exc}", param, INVALID_SCHEMA) from exc


def _call_schema(tool: ToolParam, key: str) -> dict[str, Any]:
    """`call_schema` with the arguments under ``key`` (Llama's templates say "parameters")."""
    schema = call_schema(tool)
    if key == "arguments":
        return schema
    properties = dict(schema["properties"])
    properties[key] = properties.pop("arguments")
    return {**schema, "properties": properties, "required": ["name", key]}


def _messages(messages: Sequence[ChatMessageParam], preamble: str | None) -> list[ChatMessage]:
    """Chat turns in the tool format: calls written out, results as user turns (consecutive
    results in one turn), the tool list in the system prompt."""
    out: list[ChatMessage] = []
    results: list[str] = []
    for message in messages:
        if message.role == "tool":
            results.append(render_result(message.text()))
            continue
        if results:
            out.append(ChatMessage(role="user", content="\n".join(results)))
            results = []
        if message.role == "assistant" and message.tool_calls:
            out.append(
                ChatMessage(role="assistant", content=render_calls(message.text(), message.tool_calls))
            )
        else:
            role, name = message.template_role(), message.participant()
            out.append(ChatMessage(role=role, content=message.text(), name=name))
    if results:
        out.append(ChatMessage(role="user", content="\n".join(results)))
    if preamble is not None:
        if out and out[0].role == "system":
            first = out[0].content
            out[0] = ChatMessage(role="system", content=f"{first}\n\n{preamble}" if first else preamble)
        else:
            out.insert(0, ChatMessage(role="system", content=preamble))
    return out
