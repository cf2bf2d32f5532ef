"""OpenAI wire shapes for function tools and structured output on chat completions.

Requests: `tools`, `tool_choice`, assistant `tool_calls` and `response_format` (`text`,
`json_object`, `json_schema`, plus the extension `grammar`: a Lark or llama.cpp GBNF grammar,
as llama.cpp's server takes one). The legacy `functions` / `function_call` fields are refused
(see `ChatCompletionRequest`), naming their replacements. Responses: `tool_calls` on the message
and the streamed `ToolCallDelta` fragments, in the shapes the `openai` package parses.

Sizes are bounded here (tools per request, name lengths) and schemas by
edgefleet.agent.runtimes.constraints; whether a schema compiles is checked before any token.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import ConfigDict, Field, model_serializer
from pydantic_core.core_schema import SerializerFunctionWrapHandler

from edgefleet.agent.api.protocol import OpenAIBaseModel, OpenAIRequestModel

MAX_TOOL_CALL_ID_CHARS = 256
FUNCTION_NAME = r"^[A-Za-z0-9_-]{1,64}$"  # OpenAI's rule for function and schema names


class FunctionDefinition(OpenAIRequestModel):
    name: str = Field(pattern=FUNCTION_NAME)
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema; None: no arguments
    strict: bool | None = None


class ToolParam(OpenAIRequestModel):
    type: Literal["function"]
    function: FunctionDefinition


class FunctionName(OpenAIRequestModel):
    name: str = Field(pattern=FUNCTION_NAME)


class NamedToolChoice(OpenAIRequestModel):
    type: Literal["function"]
    function: FunctionName


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice


class ToolCallFunctionParam(OpenAIRequestModel):
    name: str = Field(max_length=64)
    arguments: str


class ToolCallParam(OpenAIRequestModel):
    """A call the assistant made earlier in the conversation."""

    id: str = Field(max_length=MAX_TOOL_CALL_ID_CHARS)
    type: Literal["function"]
    function: ToolCallFunctionParam


class JSONSchemaSpec(OpenAIRequestModel):
    model_config = ConfigDict(populate_by_name=True)

    name: str = Field(pattern=FUNCTION_NAME)
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormatText(OpenAIRequestModel):
    type: Literal["text"]


class ResponseFormatJSONObject(OpenAIRequestModel):
    type: Literal["json_object"]


class ResponseFormatJSONSchema(OpenAIRequestModel):
    type: Literal["json_schema"]
    json_schema: JSONSchemaSpec


class ResponseFormatGrammar(OpenAIRequestModel):
    """Extension: the reply follows a grammar (Lark, or llama.cpp's GBNF as its server takes)."""

    type: Literal["grammar"]
    grammar: str
    syntax: Literal["gbnf", "lark"] = "gbnf"


ResponseFormat = Annotated[
    ResponseFormatText | ResponseFormatJSONObject | ResponseFormatJSONSchema | ResponseFormatGrammar,
    Field(discriminator="type"),
]


# --- responses ---------------------------------------------------------------------------


class ToolCallFunction(OpenAIBaseModel):
    name: str
    arguments: str  # JSON text, as OpenAI sends it


class ToolCall(OpenAIBaseModel):
    id: str
    type: Literal["function"] = "function"
    function: ToolCallFunction


class ToolCallFunctionDelta(OpenAIBaseModel):
    name: str | None = None
    arguments: str | None = None

    @model_serializer(mode="wrap")
    def _omit_absent(self, handler: SerializerFunctionWrapHandler) -> dict[str, str]:
        data: dict[str, Any] = handler(self)
        return {key: value for key, value in data.items() if value is not None}


class ToolCallDelta(OpenAIBaseModel):
    """A fragment of a streamed call: the first names it (id, type, name), later ones append
    to its arguments; `index` says which call of the reply it belongs to."""

    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: ToolCallFunctionDelta | None = None

    @model_serializer(mode="wrap")
    def _omit_absent(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        data: dict[str, Any] = handler(self)
        return {key: value for key, value in data.items() if value is not None}
