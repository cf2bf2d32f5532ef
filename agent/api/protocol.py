"""OpenAI wire shapes for the local API: requests are validated here, responses built from here.

Requests are strict (a string where a number belongs is a 400, as with OpenAI). Every field
of OpenAI's chat completions, completions and embeddings requests is either honoured or
refused with a 400 that names it and says why; edgefleet.agent.api.field_table lists each
one with what honours it or why it is refused, and a test walks the ``openai`` package's
request types against that table. Refused: best_of above 1, suffix, echo together
with logprobs, token-array prompts, image/audio/file content parts, embedding sizes other
than the model's, and OpenAI-hosted features (audio output, stored completions, moderation,
predicted outputs, reasoning effort, web search, service tiers; see field_rules.Refused).
logprobs / top_logprobs and logit_bias are honoured by runtimes that declare them
(llama.cpp) and refused naming the field by the others. ``top_k`` is accepted as an
extension (vLLM and llama.cpp's server take it). A ``null`` means the field's default, as in
OpenAI's API. ``n`` up to 8 choices are generated one after another (api.choices).
Other unknown fields are ignored, as extensions of newer clients.

The JSON schemas say the same (a refused field's schema lists only the values that ask for
nothing, top_logprobs needs logprobs, ...) because /openapi.json is generated from these classes and
clients and fuzzers rely on it. Every string a request carries must be Unicode text (JSON
can spell a lone surrogate; it is refused naming the field), names and stop sequences are
bounded here, and the prompt as a whole by edgefleet.agent.api.limits.
"""

from __future__ import annotations

import re
import time
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_serializer,
    model_validator,
)
from pydantic_core.core_schema import SerializerFunctionWrapHandler
from typing_extensions import TypedDict

from edgefleet.agent.api.choices import MAX_CHOICES
from edgefleet.agent.api.field_rules import NullMeansDefault, TokenBiases
from edgefleet.agent.api.field_table import REFUSALS

MAX_STOP_SEQUENCES = 4
MAX_STOP_CHARS = 512  # per stop sequence: checked against the text at every token
MAX_NAME_CHARS = 256  # model names, message names, end-user ids
MAX_EMBEDDING_INPUTS = 2048  # OpenAI's per-request limit, so clients' batching already fits
MAX_TOKENS = 2**31 - 1  # runtimes count tokens in C ints; no context comes near it
MAX_LOGIT_BIAS = 1024  # entries per request: each is applied to the logits at every token
MAX_TOP_LOGPROBS = 20  # chat top_logprobs, as OpenAI
MAX_COMPLETION_LOGPROBS = 5  # completions logprobs, as OpenAI
MAX_TOOLS = 128  # tools per chat request: OpenAI's own limit

_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def _integral(value: Any) -> Any:
    """JSON has one number type: 16.0 is the integer 16 (JSON Schema agrees), 16.5 stays an error."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


Integer = Annotated[int, BeforeValidator(_integral)]
TopK = Annotated[int, Field(ge=-1, le=MAX_TOKENS), BeforeValidator(_integral)]  # -1 and 0: no cut
ChoiceCount = Annotated[int, Field(ge=1, le=MAX_CHOICES), BeforeValidator(_integral), NullMeansDefault(1)]
TopLogprobs = Annotated[int, Field(ge=0, le=MAX_TOP_LOGPROBS), BeforeValidator(_integral)]
CompletionLogprobCount = Annotated[int, Field(ge=0, le=MAX_COMPLETION_LOGPROBS), BeforeValidator(_integral)]
PositiveInteger = Annotated[int, Field(ge=1, le=MAX_TOKENS), BeforeValidator(_integral)]


class OpenAIBaseModel(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class OpenAIRequestModel(OpenAIBaseModel):
    """Every request model and every model nested in one derives from this (a test checks)."""

    @field_validator("*")
    @classmethod
    def _unicode_text(cls, value: Any, info: ValidationInfo) -> Any:
        """JSON may spell a lone UTF-16 surrogate ("\\ud800"), which is no Unicode text: it cannot be
        encoded, tokenized or echoed back, so it is refused here, in whichever string field it is."""
        texts = [value] if isinstance(value, str) else value if isinstance(value, list) else []
        for index, text in enumerate(texts):
            if isinstance(text, str) and not text.isascii() and _LONE_SURROGATE.search(text):
                where = "" if isinstance(value, str) else f" (item {index})"
                raise ValueError(f"contains a lone UTF-16 surrogate{where}, which is not valid Unicode text")
        return value


# --- errors ------------------------------------------------------------------------------


class ErrorInfo(OpenAIBaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(OpenAIBaseModel):
    error: ErrorInfo


# --- requests ----------------------------------------------------------------------------


# OpenAI's content part types that carry something other than text, and what they carry.
_MEDIA_PARTS = {"image_url": "images", "input_audio": "audio", "file": "files", "refusal": "refusal parts"}


class TextContentPart(OpenAIRequestModel):
    type: Literal["text"]
    text: str

    @model_validator(mode="before")
    @classmethod
    def _text_only(cls, value: Any) -> Any:
        """A spec-legal image/audio/file part gets a 400 that says why, not "should be a string"."""
        kind = value.get("type") if isinstance(value, dict) else None
        if isinstance(kind, str) and kind in _MEDIA_PARTS:
            raise ValueError(
                f"{kind} content parts are not supported: this device's models take text only, "
                f"no {_MEDIA_PARTS[kind]}; send text parts or a string"
            )
        return value


class ChatMessageParam(OpenAIRequestModel):
    # The schema states the tool rules the validator below enforces, so clients and fuzzers see them.
    model_config = ConfigDict(
        json_schema_extra={
            "allOf": [
                {
                    "if": {"properties": {"role": {"const": "tool"}}, "required": ["role"]},
                    "then": {
                        "properties": {"tool_call_id": {"type": "string"}},
                        "required": ["tool_call_id"],
                    },
                },
                {
                    "if": {"properties": {"tool_calls": {"type": "array"}}, "required": ["tool_calls"]},
                    "then": {"properties": {"role": {"const": "assistant"}}},
                },
            ]
        }
    )

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextContentPart] | None = None
    # OpenAI's rule: letters, digits, _ and -, at most 64; passed to the chat template.
    name: str | None = Field(default=None, pattern=r"^[A-Za-z0-9_-]{1,64}$")
    tool_calls: list[ToolCallParam] | None = None  # assistant turns only (api.tool_calls renders them)
    tool_call_id: str | None = Field(default=None, min_length=1, max_length=MAX_NAME_CHARS)  # role "tool"

    @model_validator(mode="after")
    def _tool_fields(self) -> ChatMessageParam:
        if self.tool_calls is not None and self.role != "assistant":
            raise ValueError("tool_calls is only allowed on assistant messages")
        if self.role == "tool" and self.tool_call_id is None:
            raise ValueError("a tool message needs the tool_call_id of the call it answers")
        return self

    def text(self) -> str:
        """The content as one string (text parts are concatenated, as OpenAI does)."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)

    def participant(self) -> str | None:
        """The name a chat template may show for this turn (a tool message's name is the tool's)."""
        return None if self.role == "tool" else self.name

    def template_role(self) -> str:
        """OpenAI's newer "developer" role is a system prompt to chat templates."""
        return "system" if self.role == "developer" else self.role


class StreamOptions(OpenAIRequestModel):
    include_usage: Annotated[bool, NullMeansDefault(False)] = False
    include_obfuscation: Annotated[Any, REFUSALS["include_obfuscation"]] = None


class SamplingRequest(OpenAIRequestModel):
    """Fields shared by chat and text completions."""

    model: str = Field(max_length=MAX_NAME_CHARS)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, ge=0.0, le=1.0)
    seed: Integer | None = None  # any integer: runtimes use its low 32 bits
    stop: str | list[str] | None = Field(
        default=None,
        json_schema_extra={
            "anyOf": [
                {"type": "string", "maxLength": MAX_STOP_CHARS},
                {
                    "type": "array",
                    "items": {"type": "string", "maxLength": MAX_STOP_CHARS},
                    "maxItems": MAX_STOP_SEQUENCES,
                },
                {"type": "null"},
            ]
        },
    )
    n: ChoiceCount = 1  # several: generated one after another (edgefleet.agent.api.choices)
    stream: Annotated[bool, NullMeansDefault(False)] = False
    stream_options: StreamOptions | None = None
    frequency_penalty: Annotated[float, NullMeansDefault(0.0)] = Field(default=0.0, ge=-2.0, le=2.0)
    presence_penalty: Annotated[float, NullMeansDefault(0.0)] = Field(default=0.0, ge=-2.0, le=2.0)
    user: str | None = Field(default=None, max_length=MAX_NAME_CHARS)
    logit_bias: Annotated[dict[str, float] | None, TokenBiases(MAX_LOGIT_BIAS)] = None
    top_k: TopK | None = None  # an extension, as in vLLM and llama.cpp's server

    def token_biases(self) -> tuple[tuple[int, float], ...]:
        return tuple((int(key), float(bias)) for key, bias in (self.logit_bias or {}).items())

    @field_validator("stop")
    @classmethod
    def _few_stops(cls, value: str | list[str] | None) -> str | list[str] | None:
        if isinstance(value, list) and len(value) > MAX_STOP_SEQUENCES:
            raise ValueError(f"at most {MAX_STOP_SEQUENCES} stop sequences are allowed")
        stops = [value] if isinstance(value, str) else value or []
        if any(len(stop) > MAX_STOP_CHARS for stop in stops):
            raise ValueError(f"stop sequences may be at most {MAX_STOP_CHARS} characters long")
        return value

    def stop_sequences(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    def include_usage(self) -> bool:
        return self.stream and self.stream_options is not None and self.stream_options.include_usage


class ChatOptions(SamplingRequest):
    """Chat-only fields besides messages, tools and structured output: logprobs, and the
    OpenAI-hosted features a device refuses (see edgefleet.agent.api.field_table)."""

    # The schema says it too: top_logprobs only with logprobs=true.
    model_config = ConfigDict(
        json_schema_extra={
            "not": {
                "required": ["top_logprobs"],
                "properties": {"top_logprobs": {"type": "integer"}, "logprobs": {"not": {"const": True}}},
            }
        }
    )

    logprobs: Annotated[bool, NullMeansDefault(False)] = False
    top_logprobs: TopLogprobs | None = None
    audio: Annotated[Any, REFUSALS["audio"]] = None
    modalities: Annotated[Any, REFUSALS["modalities"]] = None
    metadata: Annotated[Any, REFUSALS["metadata"]] = None
    store: Annotated[Any, REFUSALS["store"]] = None
    moderation: Annotated[Any, REFUSALS["moderation"]] = None
    prediction: Annotated[Any, REFUSALS["prediction"]] = None
    prompt_cache_key: str | None = Field(default=None, max_length=MAX_NAME_CHARS)
    prompt_cache_options: Annotated[Any, REFUSALS["prompt_cache_options"]] = None
    prompt_cache_retention: Annotated[Any, REFUSALS["prompt_cache_retention"]] = None
    reasoning_effort: Annotated[Any, REFUSALS["reasoning_effort"]] = None
    safety_identifier: str | None = Field(default=None, max_length=MAX_NAME_CHARS)
    service_tier: Annotated[Any, REFUSALS["service_tier"]] = None
    verbosity: Annotated[Any, REFUSALS["verbosity"]] = None
    web_search_options: Annotated[Any, REFUSALS["web_search_options"]] = None

    @field_validator("top_logprobs")
    @classmethod
    def _needs_logprobs(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value is not None and info.data.get("logprobs") is not True:
            raise ValueError("top_logprobs needs logprobs=true")
        return value

    def logprobs_wanted(self) -> int | None:
        """SamplingParams.logprobs: None, or how many candidates to list per token."""
        return (self.top_logprobs or 0) if self.logprobs else None


class ChatCompletionRequest(ChatOptions):
    messages: list[ChatMessageParam] = Field(min_length=1)
    max_tokens: PositiveInteger | None = None
    max_completion_tokens: PositiveInteger | None = None
    # Tools and structured output: edgefleet.agent.api.protocol_tools and api.tool_calls.
    tools: list[ToolParam] | None = Field(default=None, max_length=MAX_TOOLS)
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: bool | None = None
    response_format: ResponseFormat | None = None
    functions: list[dict[str, Any]] | None = Field(default=None, json_schema_extra={"type": "null"})
    function_call: Any = Field(default=None, json_schema_extra={"type": "null"})

    @field_validator("functions", "function_call")
    @classmethod
    def _no_legacy_functions(cls, value: Any, info: ValidationInfo) -> Any:
        if value is not None:
            replacement = "tools" if info.field_name == "functions" else "tool_choice"
            raise ValueError(f"{info.field_name} is deprecated and not supported; use {replacement}")
        return value

    def token_limit(self) -> int | None:
        """max_completion_tokens supersedes the deprecated max_tokens, as in OpenAI's API."""
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class CompletionRequest(SamplingRequest):
    # The schema says it too: echo=true and a logprobs count are not sent together.
    model_config = ConfigDict(
        json_schema_extra={
            "not": {
                "required": ["echo", "logprobs"],
                "properties": {"echo": {"const": True}, "logprobs": {"type": "integer"}},
            }
        }
    )

    prompt: str | list[str] = Field(
        json_schema_extra={
            "anyOf": [
                {"type": "string"},
                {"type": "array", "items": {"type": "string"}, "minItems": 1, "maxItems": 1},
            ]
        }
    )
    max_tokens: Annotated[PositiveInteger, NullMeansDefault(16)] = 16  # OpenAI's default for completions
    echo: Annotated[bool, NullMeansDefault(False)] = False
    logprobs: CompletionLogprobCount | None = None
    suffix: Annotated[Any, REFUSALS["suffix"]] = None
    best_of: Annotated[Any, REFUSALS["best_of"]] = None

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, value: str | list[str]) -> str | list[str]:
        if isinstance(value, list) and len(value) != 1:
            raise ValueError("exactly one prompt is supported per request")
        return value

    @field_validator("logprobs")
    @classmethod
    def _not_with_echo(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value is not None and info.data.get("echo") is True:
            raise ValueError(
                "logprobs together with echo=true is not supported (the prompt's tokens are not "
                "scored); ask for one or the other"
            )
        return value

    def prompt_text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]


class EmbeddingRequest(OpenAIRequestModel):
    """POST /v1/embeddings. Token-array inputs are refused: the runtime embeds text."""

    model: str
    input: str | list[str] = Field(
        json_schema_extra={
            "anyOf": [
                {"type": "string", "minLength": 1},
                {
                    "type": "array",
                    "items": {"type": "string", "minLength": 1},
                    "minItems": 1,
                    "maxItems": MAX_EMBEDDING_INPUTS,
                },
            ]
        }
    )
    encoding_format: Annotated[Literal["float", "base64"], NullMeansDefault("float")] = "float"
    dimensions: PositiveInteger | None = None
    user: str | None = Field(default=None, max_length=MAX_NAME_CHARS)

    @field_validator("input", mode="before")
    @classmethod
    def _text_only(cls, value: Any) -> Any:
        if isinstance(value, list) and any(isinstance(item, int | list) for item in value):
            raise ValueError("token arrays are not supported; send the text as a string or a list of strings")
        return value

    @field_validator("input")
    @classmethod
    def _sane_inputs(cls, value: str | list[str]) -> str | list[str]:
        texts = [value] if isinstance(value, str) else value
        if not texts:
            raise ValueError("at least one input is required")
        if len(texts) > MAX_EMBEDDING_INPUTS:
            raise ValueError(f"at most {MAX_EMBEDDING_INPUTS} inputs are allowed per request")
        if any(not text for text in texts):
            raise ValueError("inputs must not be empty strings")
        return value

    def texts(self) -> list[str]:
        return [self.input] if isinstance(self.input, str) else list(self.input)


# --- responses ---------------------------------------------------------------------------

FinishReason = Literal["stop", "length"]
ChatFinishReason = Literal["stop", "length", "tool_calls"]


def _now() -> int:
    return int(time.time())


class UsageInfo(OpenAIBaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int

    @classmethod
    def of(cls, *, prompt_tokens: int, completion_tokens: int) -> UsageInfo:
        return cls(
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            total_tokens=prompt_tokens + completion_tokens,
        )


class ChatResponseMessage(OpenAIBaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    tool_calls: list[ToolCall] | None = None

    @model_serializer(mode="wrap")
    def _calls_when_made(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        # As OpenAI: content is always there (null beside calls), tool_calls only when made.
        data: dict[str, Any] = handler(self)
        if data.get("tool_calls") is None:
            data.pop("tool_calls", None)
        return data


class ChatCompletionChoice(OpenAIBaseModel):
    index: int = 0
    message: ChatResponseMessage
    finish_reason: ChatFinishReason
    logprobs: ChatChoiceLogprobs | None = None


class ChatCompletionResponse(OpenAIBaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[ChatCompletionChoice]
    usage: UsageInfo


class DeltaFields(TypedDict, total=False):
    """A delta as sent (the serialization schema in /openapi.json comes from this)."""

    role: Literal["assistant"]
    content: str
    tool_calls: list[dict[str, Any]]


class DeltaMessage(OpenAIBaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[ToolCallDelta] | None = None

    @model_serializer(mode="wrap")
    def _omit_absent(self, handler: SerializerFunctionWrapHandler) -> DeltaFields:
        # OpenAI sends only what a delta changes: {"role": ...} first, then {"content": ...}.
        data: dict[str, Any] = handler(self)
        fields = DeltaFields()
        if data.get("role") is not None:
            fields["role"] = data["role"]
        if data.get("content") is not None:
            fields["content"] = data["content"]
        if data.get("tool_calls") is not None:
            fields["tool_calls"] = data["tool_calls"]
        return fields


class ChatCompletionChunkChoice(OpenAIBaseModel):
    index: int = 0
    delta: DeltaMessage
    finish_reason: ChatFinishReason | None = None
    logprobs: ChatChoiceLogprobs | None = None


class ChatCompletionChunk(OpenAIBaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatCompletionChunkChoice]
    usage: UsageInfo | None = None


class CompletionChoice(OpenAIBaseModel):
    index: int = 0
    text: str
    finish_reason: FinishReason | None = None
    logprobs: CompletionLogprobs | None = None


class CompletionResponse(OpenAIBaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None


class ModelCard(OpenAIBaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=_now)
    owned_by: str = "edgefleet"
    max_model_len: int | None = None
    parent: str | None = None  # a LoRA adapter's model (as vLLM lists adapters); None for a model


class ModelList(OpenAIBaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class EmbeddingData(OpenAIBaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str  # str: little-endian float32, base64 (encoding_format=base64)


class EmbeddingUsage(OpenAIBaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingResponse(OpenAIBaseModel):
    object: Literal["list"] = "list"
    data: list[EmbeddingData]
    model: str
    usage: EmbeddingUsage


class HealthModel(BaseModel):
    """One model in GET /healthz."""

    id: str
    runtime: str


class HealthResponse(BaseModel):
    """GET /healthz; the agent's own health figures (state, active, ...) appear beside these."""

    model_config = ConfigDict(extra="allow")

    status: Literal["ok", "unavailable"]
    model: str | None  # the first model by name (one-model devices: the model)
    runtime: str | None = None
    models: list[HealthModel] = Field(default_factory=list)  # every model the device holds


# The tool and structured-output types derive from the bases above, so they are imported last;
# the models that name them are completed here.
from edgefleet.agent.api.protocol_logprobs import ChatChoiceLogprobs, CompletionLogprobs  # noqa: E402
from edgefleet.agent.api.protocol_tools import (  # noqa: E402
    ResponseFormat,
    ToolCall,
    ToolCallDelta,
    ToolCallParam,
    ToolChoice,
    ToolParam,
)

_TOOL_MODELS: tuple[type[BaseModel], ...] = (
    ChatMessageParam,
    ChatCompletionRequest,
    ChatResponseMessage,
    DeltaMessage,
    ChatCompletionChoice,
    ChatCompletionResponse,
    ChatCompletionChunkChoice,
    ChatCompletionChunk,
)
for _model in _TOOL_MODELS:
    _model.model_rebuild()
CompletionChoice.model_rebuild()
CompletionResponse.model_rebuild()
