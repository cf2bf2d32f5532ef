"""Tool-call formats: the one a model's own chat template declares, or the generic Hermes one.

A GGUF whose chat template handles tools (its Jinja reads ``tools``, or renders assistant
``tool_calls`` or ``tool`` turns: found by walking the template's syntax tree, not by searching
its text) is prompted through that template with ``tools=[...]`` the way Hugging Face's
``apply_chat_template`` passes them: OpenAI's function tool dicts, assistant calls with their
arguments as objects, tool results as ``tool`` turns. The format the model then answers in
is picked from the markers the template's string constants mention:

* ``hermes``: ``<tool_call>{"name": ..., "arguments": ...}</tool_call>`` (Qwen2.5, Hermes);
  also the generic format every other model is prompted with (edgefleet.agent.api.tool_calls);
* ``llama3_json``: ``{"name": ..., "parameters": ...}``, possibly after ``<|python_tag|>``
  (Llama 3.1 / 3.2; one call per reply, as their templates allow);
* ``mistral``: ``[TOOL_CALLS][{"name": ..., "arguments": ...}, ...]`` (the marker may be
  missing from the text when the vocabulary makes it a control token).

Forcing a call writes the marker as text: a vocabulary whose marker is a control token gets
it spelled in ordinary tokens, which the parser reads the same.

A template that handles tools in none of these is not used for them: the generic format is.

The template is rendered in a sandbox with what transformers provides (``raise_exception``,
``strftime_now``, loop controls, BOS/EOS texts). Message contents are replaced by unguessable
placeholders while rendering (as edgefleet.agent.runtimes.prompt does), so what the template
wrote and what the messages said stay apart and only the template's text can carry control
tokens. ``tojson`` escapes ``<``, ``>``, ``&`` and ``'`` (Jinja's, and llama-cpp-python's, own
behaviour), so tool schemas and call arguments cannot spell a ``<|...|>`` marker either.
"""

from __future__ import annotations

import json
import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from typing import Any

from edgefleet.agent.api.protocol import ChatMessageParam
from edgefleet.agent.api.protocol_tools import ToolParam
from edgefleet.agent.runtimes.base import InvalidPromptError

_MAX_ROLE_CHARS = 64
_HTML_SAFE = (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026"), ("'", "\\u0027"))
# Texts shaped like control tokens (<|eot_id|>, [INST], </s>): a tool's strings may not hold the
# ones the template writes, since a template may write those strings as they are.
_MARKER = re.compile(r"<\|[^|<>\s]{1,40}\|>|\[/?[A-Z][A-Z_]{1,30}\]|</?s>")
_PLAIN_RULE = "may hold only letters, digits and _.:- (64 at most)"
_PLAIN_ID = re.compile(r"[A-Za-z0-9_.:-]{1,64}")  # call ids a template may write out as they are


@dataclass(frozen=True, slots=True)
class ToolFormat:
    """How calls are written. ``opens``: markers a call region starts with; ``bare``: a reply
    may also start with a call's JSON itself; ``array``: calls are items of one JSON array;
    ``close``: what ends one call."""

    name: str
    opens: tuple[str, ...]
    close: str
    arguments_key: str = "arguments"
    bare: bool = False
    array: bool = False
    most: int | None = None  # calls one reply can hold in this format (None: no own limit)


HERMES = ToolFormat("hermes", opens=("<tool_call>",), close="</tool_call>")
LLAMA3_JSON = ToolFormat(
    "llama3_json", opens=("<|python_tag|>",), close="}", arguments_key="parameters", bare=True, most=1
)
# bare: a vocabulary whose [TOOL_CALLS] is a control token may leave it out of the text.
MISTRAL = ToolFormat("mistral", opens=("[TOOL_CALLS]",), close="}", bare=True, array=True)


@dataclass(frozen=True, slots=True)
class TemplateTools:
    """What a chat template does with tools."""

    reads_tools: bool
    renders_calls: bool
    renders_results: bool
    format: ToolFormat | None  # None: no known format's markers
    markers: frozenset[str] = frozenset()  # control-token-like texts the template writes

    @property
    def handles_tools(self) -> bool:
        return self.reads_tools or self.renders_calls or self.renders_results


@lru_cache(maxsize=16)
def inspect_template(template: str) -> TemplateTools:
    """Walk the template's syntax tree: names it reads, attributes it renders, its strings."""
    from jinja2 import nodes
    from jinja2.exceptions import TemplateSyntaxError

    try:
        tree = _environment().parse(template)
    except TemplateSyntaxError:
        return TemplateTools(False, False, False, None)
    reads_tools = any(node.name == "tools" for node in tree.find_all(nodes.Name))
    attributes = {node.attr for node in tree.find_all(nodes.Getattr)}
    constants = [node.value for node in tree.find_all(nodes.Const) if isinstance(node.value, str)]
    attributes |= {value for value in constants if value == "tool_calls"}  # message['tool_calls']
    renders_calls = "tool_calls" in attributes
    renders_results = any(value in ("tool", "ipython") for value in constants)
    strings = "\n".join(constants) + "\n" + "\n".join(node.data for node in tree.find_all(nodes.TemplateData))
    found: ToolFormat | None = None
    if "<tool_call>" in strings:
        found = HERMES
    elif "[TOOL_CALLS]" in strings:
        found = MISTRAL
    elif "<|python_tag|>" in strings or '"parameters"' in strings:
        found = LLAMA3_JSON
    markers = frozenset(_MARKER.findall(strings))
    return TemplateTools(reads_tools, renders_calls, renders_results, found, markers)


def template_format(template: str | None) -> ToolFormat | None:
    """The format a model's own template declares, or None (the generic format applies)."""
    if not template:
        return None
    tools = inspect_template(template)
    return tools.format if tools.handles_tools else None


# --- rendering ---------------------------------------------------------------------------


def _tojson(value: Any, indent: int | None = None, **_: Any) -> Any:
    from markupsafe import Markup

    text = json.dumps(value, ensure_ascii=False, indent=indent)
    for char, escaped in _HTML_SAFE:
        text = text.replace(char, escaped)
    return Markup(text)


def _raise(message: str) -> None:
    raise InvalidPromptError(message)


def _strftime_now(layout: str) -> str:
    return datetime.now().strftime(layout)


@lru_cache(maxsize=1)
def _environment() -> Any:
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = _strftime_now
    return env


@lru_cache(maxsize=16)
def _compiled(template: str) -> Any:
    return _environment().from_string(template)


def _arguments(text: str) -> Any:
    try:
        return json.loads(text or "{}")
    except ValueError:
        return text  # as sent: the model sees what it was told it said


def conversation(
    messages: Sequence[ChatMessageParam], nonce: str
) -> tuple[list[dict[str, Any]], dict[int, str]]:
    """The messages as the template expects them, contents replaced by placeholders."""
    contents: dict[int, str] = {}
    names: dict[str, str] = {}
    out: list[dict[str, Any]] = []
    for index, message in enumerate(messages):
        role = message.role if message.role == "tool" else message.template_role()
        if not (0 < len(role) <= _MAX_ROLE_CHARS and role.replace("_", "").replace("-", "").isalnum()):
            raise InvalidPromptError(f"message {index} has an invalid role")
        text = message.text()
        content = ""
        if text:
            contents[index] = text
            content = f"\ue000{nonce}.{index}\ue001"
        turn: dict[str, Any] = {"role": role, "content": content}
        if role != "tool" and getattr(message, "name", None) is not None:
            turn["name"] = message.name  # the protocol's pattern keeps it plain
        calls = getattr(message, "tool_calls", None) if role == "assistant" else None
        if calls:
            for call in calls:
                if not (_PLAIN_ID.fullmatch(call.id) and _PLAIN_ID.fullmatch(call.function.name)):
                    raise InvalidPromptError(
                        f"message {index}: a tool call id and name may hold only letters, digits and _.:-"
                    )
            turn["tool_calls"] = [
                {
                    "id": call.id,
                    "type": "function",
                    "function": {
                        "name": call.function.name,
                        "arguments": _arguments(call.function.arguments),
                    },
                }
                for call in calls
            ]
            names.update({call.id: call.function.name for call in calls})
        if role == "tool":
            call_id = getattr(message, "tool_call_id", None) or ""
            if not _PLAIN_ID.fullmatch(call_id):
                raise InvalidPromptError(
                    f"message {index}: tool_call_id may hold only letters, digits and _.:-"
                )
            turn["tool_call_id"] = call_id
            if call_id in names:
                turn["name"] = names[call_id]
        out.append(turn)
    return out, contents


class ToolTextError(InvalidPromptError):
    """A tool definition or earlier call holds one of the model's control markers."""


def _strings(value: Any) -> list[str]:
    """Every string (keys too) inside a JSON value."""
    out: list[str] = []
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            out.append(item)
        elif isinstance(item, dict):
            out.extend(str(key) for key in item)
            stack.extend(item.values())
        elif isinstance(item, list | tuple):
            stack.extend(item)
    return out


def render_segments(
    template: str,
    messages: Sequence[ChatMessageParam],
    tools: Sequence[ToolParam],
    *,
    bos_token: str = "",
    eos_token: str = "",
) -> list[tuple[str, bool]]:
    """The prompt the model's own template writes for these messages and tools, as
    ``(text, is_template)`` segments (the runtime's prompt pieces; see runtimes.prompt)."""
    nonce = secrets.token_hex(8)
    turns, contents = conversation(messages, nonce)
    listed = [tool.model_dump(mode="json", exclude_none=True) for tool in tools]
    markers = inspect_template(template).markers | {bos_token, eos_token} - {""}
    calls = [turn["tool_calls"] for turn in turns if "tool_calls" in turn]
    for text in _strings([listed, calls]):
        for marker in markers:
            if marker in text:
                raise ToolTextError(f"tools and tool calls may not contain the model's marker {marker!r}")
    try:
        rendered = str(
            _compiled(template).render(
                messages=turns,
                tools=listed or None,
                add_generation_prompt=True,
                bos_token=bos_token,
                eos_token=eos_token,
            )
        )
    except InvalidPromptError:
        raise
    except Exception as exc:  # model-supplied Jinja: any failure is a bad prompt
        raise InvalidPromptError(f"the model's chat template rejected the messages: {exc}") from exc
    segments: list[tuple[str, bool]] = []
    end = 0
    for match in re.finditer(f"\ue000{nonce}\\.([0-9]+)\ue001", rendered):
        said = contents.get(int(match.group(1)))
        if said is None:
            continue
        if match.start() > end:
            segments.append((rendered[end : match.start()], True))
        segments.append((said, False))
        end = match.end()
    if end < len(rendered):
        segments.append((rendered[end:], True))
    return segments


# --- forcing calls -----------------------------------------------------------------------


def format_lark(
    fmt: ToolFormat, body: dict[str, Any], *, most: int, alternative: dict[str, Any] | None
) -> str:
    """A Lark grammar: one to ``most`` calls in ``fmt`` whose bodies match ``body`` (a JSON
    schema), or instead the JSON of ``alternative`` when given."""
    from edgefleet.agent.runtimes.constraints import json_compile_options

    options = json_compile_options()
    most = min(most, fmt.most or most)
    lines = ["start: calls" + (" | answer" if alternative is not None else "")]
    if fmt is HERMES or fmt.name == HERMES.name:
        lines.append(f'calls: call ("\\n" call){{0,{most - 1}}}' if most > 1 else "calls: call")
        lines.append(f'call: "{fmt.opens[0]}\\n" body "\\n{fmt.close}"')
    elif fmt.array:
        more = f'(", " body){{0,{most - 1}}}' if most > 1 else ""
        lines.append(f'calls: "{fmt.opens[0]}[" body {more} "]"')
    else:
        lines.append(f'calls: body ("; " body){{0,{most - 1}}}' if most > 1 else "calls: body")
    lines.append(f"body: %json {json.dumps({**body, 'x-guidance': options})}")
    if alternative is not None:
        lines.append(f"answer: %json {json.dumps({**alternative, 'x-guidance': options})}")
    return "\n".join(lines)
