"""The generic tool-call format, the grammar that forces it, and the parser of every format.

Generic format: the Hermes convention that Qwen2.5 and NousResearch models are trained on,
used for every model whose chat template declares no tool format of its own (SmolLM2's
renders role and content only). A GGUF whose template does declare one is prompted through
that template and parsed in its family's format instead (edgefleet.agent.api.tool_formats).
The tools are listed in a system message as JSON inside ``<tools></tools>``; each call is a
JSON object on its own between ``<tool_call>`` and ``</tool_call>``; a tool's result goes back
as a user turn inside ``<tool_response>``. So::

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

``tool_choice`` "required" or a named function compiles that shape, with each function's own
parameters schema, into a grammar (edgefleet.agent.runtimes.constraints), so even a tiny model
returns a call that parses; "auto" leaves the model free (unless a response_format is also set:
then the reply is either calls or that JSON) and parses what it wrote.

`ToolCallParser` turns the generated text, fed in pieces as it streams, into content pieces and
OpenAI's tool-call fragments: a call is announced (index, id, name) once its name is complete,
then its arguments follow in pieces, held back only where the text might be the call's closing
brace. Fed the whole text at once, it gives the non-streamed reply, so both agree.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from edgefleet.agent.api.protocol_tools import ToolCallParam, ToolParam
from edgefleet.agent.api.tool_formats import HERMES, ToolFormat
from edgefleet.agent.runtimes.constraints import check_schema_size, json_compile_options

CALL_OPEN = "<tool_call>"
CALL_CLOSE = "</tool_call>"
# The call's opening up to the first character of its arguments (so none of the space before
# them is taken for part of them while the text is still arriving).
# A Mistral array's "[" may come first; Llama calls name their arguments "parameters".
_HEAD = re.compile(
    r'\s*\[?\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"(?:arguments|parameters)"\s*:\s*(?=\S)'
)
_MAX_HEAD_CHARS = 512  # text after <tool_call> that still has not named the function: not a call
_NO_ARGUMENTS: dict[str, Any] = {"type": "object", "properties": {}, "additionalProperties": False}


def tools_prompt(tools: Sequence[ToolParam]) -> str:
    """The system text that lists the tools and the call format."""
    listed = "\n".join(json.dumps(tool.model_dump(mode="json", exclude_none=True)) for tool in tools)
    return (
        "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
        "You are provided with function signatures within <tools></tools> XML tags:\n"
        f"<tools>\n{listed}\n</tools>\n\n"
        "For each function call, return a json object with function name and arguments within "
        "<tool_call></tool_call> XML tags:\n"
        '<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>'
    )


def render_calls(content: str, calls: Sequence[ToolCallParam]) -> str:
    """An earlier assistant turn's calls, written as the model would have written them."""
    parts = [content] if content else []
    for call in calls:
        try:
            arguments: Any = json.loads(call.function.arguments or "{}")
        except ValueError:
            arguments = call.function.arguments  # as sent: the model sees what it was told it said
        body = json.dumps({"name": call.function.name, "arguments": arguments}, ensure_ascii=False)
        parts.append(f"{CALL_OPEN}\n{body}\n{CALL_CLOSE}")
    return "\n".join(parts)


def render_result(content: str) -> str:
    """A tool's result, as the user turn that carries it."""
    return f"<tool_response>\n{content}\n</tool_response>"


def call_schema(tool: ToolParam) -> dict[str, Any]:
    """The JSON schema of one call's body: this function's name and its parameters."""
    parameters = tool.function.parameters or _NO_ARGUMENTS
    check_schema_size(parameters, what=f"parameters schema of {tool.function.name}")
    return {
        "type": "object",
        "properties": {"name": {"const": tool.function.name}, "arguments": parameters},
        "required": ["name", "arguments"],
        "additionalProperties": False,
    }


def calls_lark(tools: Sequence[ToolParam], *, most: int, alternative: dict[str, Any] | None) -> str:
    """A Lark grammar: one to ``most`` calls to ``tools``, or instead the JSON of ``alternative``
    when given (tool_choice auto with a response_format). The bound matters: a small model,
    allowed to, keeps calling until it runs out of tokens, and the last call is then cut."""
    options = json_compile_options()
    bodies = [call_schema(tool) for tool in tools]
    body = bodies[0] if len(bodies) == 1 else {"anyOf": bodies}
    lines = [
        "start: calls" + (" | answer" if alternative is not None else ""),
        f'calls: call ("\\n" call){{0,{most - 1}}}' if most > 1 else "calls: call",
        f'call: "{CALL_OPEN}\\n" body "\\n{CALL_CLOSE}"',
        f"body: %json {json.dumps({**body, 'x-guidance': options})}",
    ]
    if alternative is not None:
        lines.append(f"answer: %json {json.dumps({**alternative, 'x-guidance': options})}")
    return "\n".join(lines)


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


# --- parsing -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CallStart:
    index: int
    id: str
    name: str


@dataclass(frozen=True, slots=True)
class ArgumentsPiece:
    index: int
    text: str


@dataclass(slots=True)
class ParsedCall:
    id: str
    name: str
    arguments: list[str] = field(default_factory=list)


Event = str | CallStart | ArgumentsPiece  # str: a piece of content


class ToolCallParser:
    """Generated text in, content and call fragments out (see the module docstring), for the
    generic format or a model's own (edgefleet.agent.api.tool_formats)."""

    def __init__(self, names: Sequence[str], fmt: ToolFormat = HERMES) -> None:
        self._names = frozenset(names)
        self._format = fmt
        self._buffer = ""
        self._state = "text"  # text -> head -> arguments -> close -> text ...
        self._opener = ""  # the marker the current call region opened with
        self._arguments = ""  # the current call's argument text so far
        self._sent = 0  # how much of it has been handed out
        self.calls: list[ParsedCall] = []
        self.content: list[str] = []

    def feed(self, text: str) -> list[Event]:
        self._buffer += text
        events: list[Event] = []
        while self._step(events):
            pass
        return events

    def finish(self) -> list[Event]:
        """The rest, at the end of generation (a cut-off call keeps the arguments it has)."""
        events: list[Event] = []
        if self._state == "text" and self._buffer and not self.calls:
            self._content(events, self._buffer)
        elif self._state == "head" and not self.calls:
            self._content(events, self._opener + self._buffer)
        elif self._state == "arguments":
            self._arguments += self._buffer
            self._pieces(events, len(self._arguments))
        self._buffer = ""
        self._state = "text"
        return events

    def _content(self, events: list[Event], text: str) -> None:
        if text:
            self.content.append(text)
            events.append(text)

    def _pieces(self, events: list[Event], upto: int) -> None:
        if upto > self._sent:
            piece = self._arguments[self._sent : upto]
            self._sent = upto
            self.calls[-1].arguments.append(piece)
            events.append(ArgumentsPiece(len(self.calls) - 1, piece))

    def _not_a_call(self, events: list[Event], buffer: str) -> bool:
        if not self.calls:
            self._content(events, self._opener + buffer)
        self._buffer = ""
        self._state = "text"
        return False

    def _text(self, events: list[Event], buffer: str) -> bool:
        fmt = self._format
        if fmt.bare and (not self.content or self.calls):  # a reply (or what follows a call) may be JSON
            stripped = buffer.lstrip(" \t\r\n;" if self.calls else " \t\r\n")
            if not stripped:
                self._buffer = buffer
                return False
            if stripped.startswith("{") or (
                fmt.array and _may_start_call(stripped) and not _opens(stripped, fmt)
            ):
                self._buffer = stripped
                self._opener, self._state = "", "head"
                return True
        found = [(buffer.find(marker), marker) for marker in fmt.opens]
        found = [(at, marker) for at, marker in found if at >= 0]
        if not found:
            keep = max(_partial_suffix(buffer, marker) for marker in fmt.opens)
            if not self.calls:  # text after the calls is not part of the reply
                self._content(events, buffer[: len(buffer) - keep])
            self._buffer = buffer[len(buffer) - keep :]
            return False
        at, marker = min(found)
        if not self.calls:
            self._content(events, buffer[:at])
        self._buffer = buffer[at + len(marker) :]
        self._opener, self._state = marker, "head"
        return True

    def _step(self, events: list[Event]) -> bool:
        """One state's worth of progress; False when it needs more text."""
        buffer = self._buffer
        fmt = self._format
        if self._state == "text":
            return self._text(events, buffer)
        if self._state == "between":  # after an array item: another one, or the array's end
            stripped = buffer.lstrip()
            if not stripped:
                return False
            self._buffer = stripped[1:] if stripped.startswith(",") else stripped
            self._state = "head" if stripped.startswith(",") else "text"
            return True
        if self._state == "head":
            match = _HEAD.match(buffer)
            if match is None:
                if len(buffer) > _MAX_HEAD_CHARS or fmt.close in buffer or not _may_start_call(buffer):
                    return self._not_a_call(events, buffer)
                return False
            name = _json_string(match.group(1))
            if name is None or name not in self._names:
                return self._not_a_call(events, buffer)
            call = ParsedCall(id=new_call_id(), name=name)
            self.calls.append(call)
            events.append(CallStart(len(self.calls) - 1, call.id, name))
            self._buffer = buffer[match.end() :]
            self._arguments, self._sent = "", 0
            self._state = "arguments"
            return True
        if self._state == "arguments":
            self._arguments += buffer
            self._buffer = ""
            end = _json_end(self._arguments)
            if end is None:
                self._pieces(events, len(self._arguments.rstrip("} \t\r\n")))
                return False
            self._pieces(events, end)
            self._buffer = self._arguments[end:]
            self._arguments = self._arguments[:end]
            self._state = "close"
            return True
        at = buffer.find(fmt.close)  # close: the rest of the call up to its end
        if at < 0:
            self._buffer = buffer[-len(fmt.close) :]
            return False
        self._buffer = buffer[at + len(fmt.close) :]
        self._state = "between" if fmt.array else "text"
        return True


def _may_start_call(text: str) -> bool:
    """Whether ``text`` (after a call marker) could still be the opening of a call's JSON."""
    stripped = text.lstrip()
    if stripped.startswith("["):  # an array of calls: its first item must be an object
        stripped = stripped[1:].lstrip()
        return not stripped or stripped[0] == "{"
    return not stripped or stripped[0] == "{"


def _opens(text: str, fmt: ToolFormat) -> bool:
    """Whether ``text`` is, or may still become, one of the format's call markers."""
    return any(marker.startswith(text[: len(marker)]) for marker in fmt.opens)


def _partial_suffix(text: str, marker: str) -> int:
    """Length of the longest end of ``text`` that ``marker`` starts with."""
    for size in range(min(len(text), len(marker) - 1), 0, -1):
        if marker.startswith(text[-size:]):
            return size
    return 0


def _json_string(body: str) -> str | None:
    try:
        value = json.loads(f'"{body}"')
    except ValueError:
        return None
    return value if isinstance(value, str) else None


_DECODER = json.JSONDecoder()


def _json_end(text: str) -> int | None:
    """Where the JSON value at the start of ``text`` ends, or None while it is incomplete."""
    start = len(text) - len(text.lstrip())
    if start == len(text):
        return None
    try:
        _, end = _DECODER.raw_decode(text, start)
    except ValueError:
        return None
    return end
