"""OpenAI wire shapes for the local API: requests are validated here, responses built from here.

Requests are strict (a string where a number belongs is a 400, as with OpenAI) but ignore
unknown fields, so newer clients that send extra options still work. Only what this agent
can honour is accepted; options it cannot (n > 1, logprobs, echo, suffix, token-array
inputs, other embedding sizes) are refused rather than silently ignored. The JSON schemas
say the same (n is exactly 1, echo only false, ...) because /openapi.json is generated
from these classes and clients and fuzzers rely on it. Every string a request carries must
be Unicode text (JSON can spell a lone surrogate; it is refused naming the field), names and
stop sequences are bounded here, and the prompt as a whole by edgefleet.agent.api.limits.
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
)
from pydantic_core.core_schema import SerializerFunctionWrapHandler
from typing_extensions import TypedDict

MAX_STOP_SEQUENCES = 4
MAX_STOP_CHARS = 512  # per stop sequence: checked against the text at every token
MAX_NAME_CHARS = 256  # model names, message names, end-user ids
MAX_EMBEDDING_INPUTS = 2048  # OpenAI's per-request limit, so clients' batching already fits
MAX_TOKENS = 2**31 - 1  # runtimes count tokens in C ints; no context comes near it

_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def _integral(value: Any) -> Any:
    """JSON has one number type: 16.0 is the integer 16 (JSON Schema agrees), 16.5 stays an error."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


Integer = Annotated[int, BeforeValidator(_integral)]
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


class TextContentPart(OpenAIRequestModel):
    type: Literal["text"]
    text: str


class ChatMessageParam(OpenAIRequestModel):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextContentPart] | None = None
    name: str | None = Field(default=None, max_length=MAX_NAME_CHARS)

    def text(self) -> str:
        """The content as one string (text parts are concatenated, as OpenAI does)."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)

    def template_role(self) -> str:
        """OpenAI's newer "developer" role is a system prompt to chat templates."""
        return "system" if self.role == "developer" else self.role


class StreamOptions(OpenAIRequestModel):
    include_usage: bool = False


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
    n: Integer = Field(default=1, json_schema_extra={"minimum": 1, "maximum": 1})
    stream: bool = False
    stream_options: StreamOptions | None = None
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    user: str | None = Field(default=None, max_length=MAX_NAME_CHARS)

    @field_validator("n")
    @classmethod
    def _one_choice(cls, value: int) -> int:
        if value != 1:
            raise ValueError("only n=1 is supported")
        return value

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


class ChatCompletionRequest(SamplingRequest):
    messages: list[ChatMessageParam] = Field(min_length=1)
    max_tokens: PositiveInteger | None = None
    max_completion_tokens: PositiveInteger | None = None

    def token_limit(self) -> int | None:
        """max_completion_tokens supersedes the deprecated max_tokens, as in OpenAI's API."""
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class CompletionRequest(SamplingRequest):
    prompt: str | list[str] = Field(
        json_schema_extra={
            "anyOf": [
                {"type": "string"},
                {"type": "array", "items": {"type": "string"}, "minItems": 1, "maxItems": 1},
            ]
        }
    )
    max_tokens: PositiveInteger | None = 16  # OpenAI's default for completions
    echo: bool = Field(default=False, json_schema_extra={"const": False})
    logprobs: int | None = Field(default=None, json_schema_extra={"anyOf": [{"type": "null"}]})
    suffix: str | None = Field(default=None, json_schema_extra={"anyOf": [{"type": "null"}]})

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, value: str | list[str]) -> str | list[str]:
        if isinstance(value, list) and len(value) != 1:
            raise ValueError("exactly one prompt is supported per request")
        return value

    @field_validator("echo")
    @classmethod
    def _no_echo(cls, value: bool) -> bool:
        if value:
            raise ValueError("echo is not supported")
        return value

    @field_validator("logprobs")
    @classmethod
    def _no_logprobs(cls, value: int | None) -> int | None:
        if value is not None:
            raise ValueError("logprobs are not supported")
        return value

    @field_validator("suffix")
    @classmethod
    def _no_suffix(cls, value: str | None) -> str | None:
        if value is not None:
            raise ValueError("suffix (fill-in-the-middle) is not supported")
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
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: PositiveInteger | None = None
    user: str | None = None

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
    content: str


class ChatCompletionChoice(OpenAIBaseModel):
    index: int = 0
    message: ChatResponseMessage
    finish_reason: FinishReason
    logprobs: None = None


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


class DeltaMessage(OpenAIBaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None

    @model_serializer(mode="wrap")
    def _omit_absent(self, handler: SerializerFunctionWrapHandler) -> DeltaFields:
        # OpenAI sends only what a delta changes: {"role": ...} first, then {"content": ...}.
        data: dict[str, Any] = handler(self)
        fields = DeltaFields()
        if data.get("role") is not None:
            fields["role"] = data["role"]
        if data.get("content") is not None:
            fields["content"] = data["content"]
        return fields


class ChatCompletionChunkChoice(OpenAIBaseModel):
    index: int = 0
    delta: DeltaMessage
    finish_reason: FinishReason | None = None
    logprobs: None = None


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
    logprobs: None = None


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
