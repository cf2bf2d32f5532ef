"""Ollama's wire shapes (docs/api.md of ollama/ollama): requests checked here, responses built from here.

Requests follow the OpenAI side's rules (edgefleet.agent.api.protocol): strict types, unknown
top-level fields ignored, lone surrogates refused. What this device cannot do is refused with
a 400 naming the field, never dropped: images (the models read text), `suffix` (fill in the
middle), a custom `template`, the deprecated `context` token list, `think`, logprobs, and for
now `tools`. The JSON schemas in /openapi.json say the same (those fields only accept null or
an empty value), since clients and the fuzz test trust them. `format` ("json" or a JSON
schema) constrains the output through the grammar engine (see `structured`).

`stream` is true when absent, as in Ollama. `keep_alive` is read as a residency hint only:
when a model leaves memory is the device's keep-alive policy, which the fleet configures;
any valid duration is accepted and the policy stays in charge.
Responses leave out what Ollama leaves out: a streamed chunk carries no done_reason or
figures, which only the last one (done: true) has; durations are integer nanoseconds.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from edgefleet.agent.api.ollama.options import OllamaOptions
from edgefleet.agent.api.protocol import (
    MAX_EMBEDDING_INPUTS,
    MAX_NAME_CHARS,
    OpenAIRequestModel,
    PositiveInteger,
)

T = TypeVar("T")

LATEST = ":latest"  # Ollama's default tag: "name" and "name:latest" are the same model
_EMPTY_LIST: dict[str, Any] = {"anyOf": [{"type": "array", "maxItems": 0}, {"type": "null"}]}
_EMPTY_TEXT: dict[str, Any] = {"anyOf": [{"type": "string", "maxLength": 0}, {"type": "null"}]}
_FALSE_ONLY: dict[str, Any] = {"anyOf": [{"const": False}, {"type": "null"}]}
_NULL_ONLY: dict[str, Any] = {"anyOf": [{"type": "null"}]}
# A number of seconds or a Go duration ("5m", "1h30m"); the schema's pattern, as Python reads it
_DURATION = re.compile(r"^(?:-?(?:[0-9]+(?:\.[0-9]+)?(?:ns|us|µs|ms|s|m|h))+|-?[0-9]+(?:\.[0-9]+)?)$")
MAX_DURATION_CHARS = 32


def created_at() -> str:
    """Now, as Ollama writes it: RFC 3339 in UTC with sub-second digits."""
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


# --- requests ----------------------------------------------------------------------------


def _refuse_if_set(value: T, message: str) -> T:
    if value:
        raise ValueError(message)
    return value


class OllamaMessage(OpenAIRequestModel):
    """One chat turn. Tool turns and images are refused (see the module docstring)."""

    role: Literal["system", "user", "assistant"]
    content: str = ""
    images: list[str] | None = Field(default=None, json_schema_extra=_EMPTY_LIST)
    tool_calls: list[dict[str, Any]] | None = Field(default=None, json_schema_extra=_EMPTY_LIST)

    @field_validator("images")
    @classmethod
    def _no_images(cls, value: list[str] | None) -> list[str] | None:
        return _refuse_if_set(value, "images are not supported: the models on this device read text only")

    @field_validator("tool_calls")
    @classmethod
    def _no_tool_calls(cls, value: list[dict[str, Any]] | None) -> list[dict[str, Any]] | None:
        return _refuse_if_set(value, "tool calls are not supported by this device's Ollama API yet")


class OllamaModelRequest(OpenAIRequestModel):
    model: str = Field(max_length=MAX_NAME_CHARS)
    options: OllamaOptions | None = None
    keep_alive: float | str | None = Field(
        default=None,
        json_schema_extra={
            "anyOf": [
                {"type": "number"},
                {"type": "string", "pattern": _DURATION.pattern, "maxLength": MAX_DURATION_CHARS},
                {"type": "null"},
            ]
        },
    )

    @field_validator("keep_alive")
    @classmethod
    def _duration(cls, value: float | str | None) -> float | str | None:
        if isinstance(value, str) and (len(value) > MAX_DURATION_CHARS or not _DURATION.search(value)):
            raise ValueError("keep_alive must be a number of seconds or a duration such as '5m' or '1h30m'")
        return value

    def sampling_options(self) -> OllamaOptions:
        return self.options or OllamaOptions()


class OllamaGenerationRequest(OllamaModelRequest):
    """What /api/chat and /api/generate share."""

    stream: bool = True
    format: str | dict[str, Any] | None = Field(
        default=None,
        json_schema_extra={"anyOf": [{"enum": ["", "json"]}, {"type": "object"}, {"type": "null"}]},
    )
    think: bool | None = Field(default=None, json_schema_extra=_FALSE_ONLY)
    logprobs: bool | None = Field(default=None, json_schema_extra=_FALSE_ONLY)
    top_logprobs: int | None = Field(default=None, json_schema_extra=_NULL_ONLY)

    @field_validator("format")
    @classmethod
    def _json_or_schema(cls, value: str | dict[str, Any] | None) -> str | dict[str, Any] | None:
        if isinstance(value, str) and value not in ("", "json"):
            raise ValueError("format must be 'json' or a JSON schema")
        return value

    @field_validator("think")
    @classmethod
    def _no_think(cls, value: bool | None) -> bool | None:
        return _refuse_if_set(value, "the models on this device do not support thinking")

    @field_validator("logprobs")
    @classmethod
    def _no_logprobs(cls, value: bool | None) -> bool | None:
        return _refuse_if_set(value, "logprobs are not supported by this device's Ollama API yet")

    @field_validator("top_logprobs")
    @classmethod
    def _no_top_logprobs(cls, value: int | None) -> int | None:
        if value is not None:
            raise ValueError("top_logprobs is not supported by this device's Ollama API yet")
        return value


class OllamaChatRequest(OllamaGenerationRequest):
    """POST /api/chat. No messages at all: load the model and answer done_reason "load"."""

    messages: list[OllamaMessage] = Field(default_factory=list)
    tools: list[dict[str, Any]] | None = Field(default=None, json_schema_extra=_EMPTY_LIST)

    @field_validator("tools")
    @classmethod
    def _no_tools(cls, value: list[dict[str, Any]] | None) -> list[dict[str, Any]] | None:
        return _refuse_if_set(value, "tools are not supported by this device's Ollama API yet")


class OllamaGenerateRequest(OllamaGenerationRequest):
    """POST /api/generate. The prompt goes through the model's chat template (with `system`)
    unless `raw`; a model without a chat template takes the prompt as it is, as Ollama's
    templates for base models do. No prompt at all: load the model, done_reason "load"."""

    prompt: str = ""
    system: str | None = None
    raw: bool = False
    suffix: str | None = Field(default=None, json_schema_extra=_EMPTY_TEXT)
    template: str | None = Field(default=None, json_schema_extra=_EMPTY_TEXT)
    context: list[int] | None = Field(default=None, json_schema_extra=_EMPTY_LIST)
    images: list[str] | None = Field(default=None, json_schema_extra=_EMPTY_LIST)
    width: int | None = Field(default=None, json_schema_extra=_NULL_ONLY)
    height: int | None = Field(default=None, json_schema_extra=_NULL_ONLY)
    steps: int | None = Field(default=None, json_schema_extra=_NULL_ONLY)

    # raw mode leaves out the chat template, so it cannot carry a system text either
    model_config = ConfigDict(
        json_schema_extra={
            "not": {
                "required": ["raw", "system"],
                "properties": {"raw": {"const": True}, "system": {"type": "string", "minLength": 1}},
            }
        }
    )

    @model_validator(mode="after")
    def _raw_has_no_system(self) -> OllamaGenerateRequest:
        if self.raw and self.system:
            raise ValueError("system needs the model's chat template, which raw mode leaves out")
        return self

    @field_validator("width", "height", "steps")
    @classmethod
    def _no_images_out(cls, value: int | None) -> int | None:
        if value is not None:
            raise ValueError("image generation is not supported on this device")
        return value

    @field_validator("suffix")
    @classmethod
    def _no_suffix(cls, value: str | None) -> str | None:
        return _refuse_if_set(value, "suffix (fill in the middle) is not supported")

    @field_validator("template")
    @classmethod
    def _no_template(cls, value: str | None) -> str | None:
        return _refuse_if_set(value, "template is not supported: the model's own chat template is used")

    @field_validator("context")
    @classmethod
    def _no_context(cls, value: list[int] | None) -> list[int] | None:
        return _refuse_if_set(
            value, "context (token lists) is not supported; send the conversation to /api/chat"
        )

    @field_validator("images")
    @classmethod
    def _no_images(cls, value: list[str] | None) -> list[str] | None:
        return _refuse_if_set(value, "images are not supported: the models on this device read text only")


class OllamaEmbedRequest(OllamaModelRequest):
    """POST /api/embed. `truncate` may stay true, but an input longer than the model's window
    is refused rather than cut (the runtimes embed whole texts); `dimensions` is refused (no
    runtime here shortens its vectors)."""

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
    truncate: bool = True
    dimensions: PositiveInteger | None = Field(default=None, json_schema_extra=_NULL_ONLY)

    @field_validator("dimensions")
    @classmethod
    def _native_size(cls, value: int | None) -> int | None:
        if value is not None:
            raise ValueError("dimensions is not supported: the models here return vectors of their own size")
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


class OllamaEmbeddingsRequest(OllamaModelRequest):
    """POST /api/embeddings, the older single-text form; an empty prompt gets an empty vector."""

    prompt: str = ""


class OllamaShowRequest(OpenAIRequestModel):
    """POST /api/show. `verbose` asks for vocabulary-sized model_info fields, which this device
    does not list, so the answer is the same either way."""

    model: str = Field(max_length=MAX_NAME_CHARS)
    verbose: bool = False


# --- responses ---------------------------------------------------------------------------

DoneReason = Literal["stop", "length", "load"]


class OllamaResponseModel(BaseModel):
    """Responses leave out unset optional fields, as Ollama's `omitempty` does."""

    model_config = ConfigDict(extra="forbid")

    def body(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude_none=True)


class OllamaError(OllamaResponseModel):
    """Ollama's error body; `code` is this device's error code (the /v1 ones), which Ollama
    clients ignore and scripts may match on."""

    error: str
    code: str | None = None


class Timings(OllamaResponseModel):
    """The figures of a finished request, in nanoseconds (see serving.timings)."""

    total_duration: int | None = None
    load_duration: int | None = None
    prompt_eval_count: int | None = None
    prompt_eval_duration: int | None = None
    eval_count: int | None = None
    eval_duration: int | None = None


class AssistantMessage(OllamaResponseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class _ChatHead(OllamaResponseModel):
    model: str
    created_at: str = Field(default_factory=created_at)
    message: AssistantMessage
    done: bool
    done_reason: DoneReason | None = None


class _GenerateHead(OllamaResponseModel):
    model: str
    created_at: str = Field(default_factory=created_at)
    response: str
    done: bool
    done_reason: DoneReason | None = None


class _EmbedHead(OllamaResponseModel):
    model: str
    embeddings: list[list[float]]


# Timings comes first among the bases so that its fields come last in the JSON, as in Ollama's.
class OllamaChatResponse(Timings, _ChatHead):
    """A /api/chat chunk (done: false) or the final object (done: true, with the figures)."""


class OllamaGenerateResponse(Timings, _GenerateHead):
    """A /api/generate chunk (done: false) or the final object (done: true, with the figures)."""


class OllamaEmbedResponse(Timings, _EmbedHead):
    """The vectors, one per input, with total_duration, load_duration and prompt_eval_count."""


class OllamaEmbeddingsResponse(OllamaResponseModel):
    embedding: list[float]


class ModelDetails(OllamaResponseModel):
    parent_model: str = ""
    format: str
    family: str = ""
    families: list[str] | None = None
    parameter_size: str = ""
    quantization_level: str = ""


class ListedModel(OllamaResponseModel):
    """One model in GET /api/tags."""

    name: str
    model: str
    modified_at: str
    size: int
    digest: str
    details: ModelDetails


class OllamaTagsResponse(OllamaResponseModel):
    models: list[ListedModel]


class RunningModel(OllamaResponseModel):
    """One model in GET /api/ps."""

    name: str
    model: str
    size: int
    digest: str
    details: ModelDetails
    expires_at: str
    size_vram: int
    context_length: int


class OllamaPsResponse(OllamaResponseModel):
    models: list[RunningModel]


class OllamaShowResponse(OllamaResponseModel):
    modelfile: str
    parameters: str
    template: str
    details: ModelDetails
    model_info: dict[str, Any]
    capabilities: list[str]
    modified_at: str


class OllamaVersionResponse(OllamaResponseModel):
    version: str
