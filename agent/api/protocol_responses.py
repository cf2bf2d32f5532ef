"""OpenAI Responses API wire shapes (POST /v1/responses), stateless.

The device keeps no conversations: `store: true`, `previous_response_id`, `conversation` and
`background: true` are refused (400, naming the field) instead of pretending; a client sends
the whole conversation as input items, function calls and their outputs included. Input is
text or a list of items: messages (text parts only), `function_call` and
`function_call_output`. Tools are function tools; `text.format` is `text`, `json_object` or
`json_schema`. The reply objects follow the `openai` package's `Response` type, so
`client.responses.create(...).output_text` works.
"""

from __future__ import annotations

import time
from typing import Any, Literal

from pydantic import ConfigDict, Field, field_validator, model_serializer, model_validator
from pydantic_core.core_schema import SerializerFunctionWrapHandler

from edgefleet.agent.api.protocol import (
    MAX_NAME_CHARS,
    MAX_TOOLS,
    OpenAIBaseModel,
    OpenAIRequestModel,
    PositiveInteger,
)
from edgefleet.agent.api.protocol_tools import FUNCTION_NAME


class InputTextPart(OpenAIRequestModel):
    type: Literal["input_text", "output_text", "text"]
    text: str


def _needs(kind: str, *fields: str) -> dict[str, Any]:
    """JSON schema: an item of ``type`` ``kind`` carries ``fields`` as strings."""
    return {
        "if": {"properties": {"type": {"const": kind}}, "required": ["type"]},
        "then": {"properties": {name: {"type": "string"} for name in fields}, "required": list(fields)},
    }


class InputItem(OpenAIRequestModel):
    """A message (``type`` "message" or absent), a function call the model made, or its output."""

    model_config = ConfigDict(
        json_schema_extra={
            "allOf": [
                _needs("function_call", "call_id", "name", "arguments"),
                _needs("function_call_output", "call_id", "output"),
                {
                    "if": {
                        "properties": {"type": {"enum": ["function_call", "function_call_output"]}},
                        "required": ["type"],
                    },
                    "else": {"properties": {"role": {"type": "string"}}, "required": ["role"]},
                },
            ]
        }
    )

    type: Literal["message", "function_call", "function_call_output"] | None = None
    role: Literal["user", "assistant", "system", "developer"] | None = None
    content: str | list[InputTextPart] | None = None
    call_id: str | None = Field(default=None, min_length=1, max_length=MAX_NAME_CHARS)
    name: str | None = Field(default=None, max_length=64)
    arguments: str | None = None
    output: str | None = None
    id: str | None = Field(default=None, max_length=MAX_NAME_CHARS)
    status: str | None = None

    @model_validator(mode="after")
    def _complete(self) -> InputItem:
        kind = self.type or "message"
        if kind == "message" and self.role is None:
            raise ValueError("a message item needs a role")
        if kind == "function_call" and (self.call_id is None or self.name is None or self.arguments is None):
            raise ValueError("a function_call item needs call_id, name and arguments")
        if kind == "function_call_output" and (self.call_id is None or self.output is None):
            raise ValueError("a function_call_output item needs call_id and output")
        return self

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class FunctionToolParam(OpenAIRequestModel):
    type: Literal["function"]
    name: str = Field(pattern=FUNCTION_NAME)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class FunctionChoice(OpenAIRequestModel):
    type: Literal["function"]
    name: str = Field(pattern=FUNCTION_NAME)


class TextFormat(OpenAIRequestModel):
    model_config = ConfigDict(
        populate_by_name=True,
        json_schema_extra={
            "if": {"properties": {"type": {"const": "json_schema"}}, "required": ["type"]},
            "then": {
                "properties": {"name": {"type": "string"}, "schema": {"type": "object"}},
                "required": ["name", "schema"],
            },
        },
    )

    type: Literal["text", "json_object", "json_schema"]
    name: str | None = Field(default=None, pattern=FUNCTION_NAME)
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    description: str | None = None
    strict: bool | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> TextFormat:
        if self.type == "json_schema" and (self.name is None or self.schema_ is None):
            raise ValueError("a json_schema format needs name and schema")
        return self


class TextConfig(OpenAIRequestModel):
    format: TextFormat | None = None


_FALSE_OR_NULL: dict[str, Any] = {"anyOf": [{"const": False}, {"type": "null"}]}


class ResponsesRequest(OpenAIRequestModel):
    model: str = Field(max_length=MAX_NAME_CHARS)
    input: str | list[InputItem] = Field(
        json_schema_extra={
            "anyOf": [
                {"type": "string"},
                {"type": "array", "items": {"$ref": "#/components/schemas/InputItem"}, "minItems": 1},
            ]
        }
    )
    instructions: str | None = None
    tools: list[FunctionToolParam] | None = Field(default=None, max_length=MAX_TOOLS)
    tool_choice: Literal["none", "auto", "required"] | FunctionChoice | None = None
    parallel_tool_calls: bool | None = None
    text: TextConfig | None = None
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, ge=0.0, le=1.0)
    max_output_tokens: PositiveInteger | None = None
    stream: bool = False
    metadata: dict[str, str] | None = None
    user: str | None = Field(default=None, max_length=MAX_NAME_CHARS)
    # Statefulness, refused: the device stores nothing between requests.
    store: bool | None = Field(
        default=None, json_schema_extra={"anyOf": [{"const": False}, {"type": "null"}]}
    )
    previous_response_id: str | None = Field(default=None, json_schema_extra={"type": "null"})
    conversation: Any = Field(default=None, json_schema_extra={"type": "null"})
    background: bool | None = Field(
        default=None, json_schema_extra={"anyOf": [{"const": False}, {"type": "null"}]}
    )

    @field_validator("store", "background")
    @classmethod
    def _not_stored(cls, value: bool | None) -> bool | None:
        if value:
            raise ValueError("responses are not stored on this device (it is stateless); send store=false")
        return value

    @field_validator("previous_response_id", "conversation")
    @classmethod
    def _no_state(cls, value: Any) -> Any:
        if value is not None:
            raise ValueError(
                "this device keeps no responses or conversations; send the whole conversation as input"
            )
        return value

    @field_validator("input")
    @classmethod
    def _some_input(cls, value: str | list[InputItem]) -> str | list[InputItem]:
        if isinstance(value, list) and not value:
            raise ValueError("input must not be empty")
        return value


# --- responses ---------------------------------------------------------------------------


class OutputText(OpenAIBaseModel):
    type: Literal["output_text"] = "output_text"
    text: str
    annotations: list[Any] = Field(default_factory=list)


class OutputMessage(OpenAIBaseModel):
    type: Literal["message"] = "message"
    id: str
    status: Literal["in_progress", "completed", "incomplete"]
    role: Literal["assistant"] = "assistant"
    content: list[OutputText]


class FunctionCallItem(OpenAIBaseModel):
    type: Literal["function_call"] = "function_call"
    id: str
    call_id: str
    name: str
    arguments: str
    status: Literal["in_progress", "completed", "incomplete"]


OutputItem = OutputMessage | FunctionCallItem


class InputTokensDetails(OpenAIBaseModel):
    cached_tokens: int = 0


class OutputTokensDetails(OpenAIBaseModel):
    reasoning_tokens: int = 0


class ResponseUsage(OpenAIBaseModel):
    input_tokens: int
    output_tokens: int
    total_tokens: int
    input_tokens_details: InputTokensDetails = Field(default_factory=InputTokensDetails)
    output_tokens_details: OutputTokensDetails = Field(default_factory=OutputTokensDetails)


class IncompleteDetails(OpenAIBaseModel):
    reason: Literal["max_output_tokens"]


class ResponseObject(OpenAIBaseModel):
    id: str
    object: Literal["response"] = "response"
    created_at: float = Field(default_factory=time.time)
    status: Literal["in_progress", "completed", "incomplete"]
    model: str
    output: list[OutputItem]
    instructions: str | None = None
    tools: list[dict[str, Any]] = Field(default_factory=list)
    tool_choice: Any = "auto"
    parallel_tool_calls: bool = True
    text: dict[str, Any] = Field(default_factory=lambda: {"format": {"type": "text"}})
    temperature: float | None = None
    top_p: float | None = None
    max_output_tokens: int | None = None
    metadata: dict[str, str] = Field(default_factory=dict)
    incomplete_details: IncompleteDetails | None = None
    error: None = None
    usage: ResponseUsage | None = None
    store: bool = False
    previous_response_id: None = None


class ResponseEvent(OpenAIBaseModel):
    """One server-sent event of a streamed response; fields beyond ``type`` and
    ``sequence_number`` depend on the type (OpenAI's response.* event shapes)."""

    type: str
    sequence_number: int
    response: ResponseObject | None = None
    output_index: int | None = None
    item: OutputItem | None = None
    item_id: str | None = None
    content_index: int | None = None
    part: OutputText | None = None
    delta: str | None = None
    text: str | None = None
    arguments: str | None = None
    logprobs: list[Any] | None = None

    @model_serializer(mode="wrap")
    def _omit_absent(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        data: dict[str, Any] = handler(self)
        return {key: value for key, value in data.items() if value is not None}
