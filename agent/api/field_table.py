"""Every field of OpenAI's chat completions, completions and embeddings requests, and what
this API does with it: honoured (and by what), refused with a 400 naming it (and why), or
handled by the tools and structured-output support (edgefleet.agent.api.protocol_tools).

Nothing is accepted and ignored. tests/unit/test_api_fields.py walks the request types of the
installed ``openai`` package and fails for a field missing from this table, so a field OpenAI
adds later is refused by default (unknown fields are ignored by the request models, so the
test is what catches it) until someone decides here what it means on a device.

The refusals themselves (`REFUSALS`) are the validators the request models in
edgefleet.agent.api.protocol put on those fields, so the table and the behaviour share one text.
Fields honoured only by some runtimes (logprobs, logit_bias: llama.cpp) are refused with a 400
naming them by the others (edgefleet.agent.runtimes.base.require_support).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Final

from edgefleet.agent.api.field_rules import Refused


@dataclass(frozen=True, slots=True)
class Honoured:
    by: str  # what honours it


@dataclass(frozen=True, slots=True)
class Refusal:
    example: Any  # a value that is refused (tests send it)

    def __post_init__(self) -> None:
        assert self.example is not None


@dataclass(frozen=True, slots=True)
class ToolsWork:
    """tools / tool_choice / response_format and the legacy function fields: their own work."""

    by: str = "edgefleet.agent.api.protocol_tools (tools, structured output)"


Disposition = Honoured | Refusal | ToolsWork

_TEXT_ONLY = "this device's models produce text only"
_NOT_STORED = "completions are not stored on this device"

REFUSALS: Final[Mapping[str, Refused]] = MappingProxyType(
    {
        "audio": Refused(f"{_TEXT_ONLY}; audio output is not supported"),
        "modalities": Refused(f'{_TEXT_ONLY}; only ["text"] is supported', accepts=(["text"],)),
        "metadata": Refused(f"{_NOT_STORED}, so there is nothing to attach metadata to"),
        "store": Refused(f"{_NOT_STORED}; omit store or send false", accepts=(False,)),
        "moderation": Refused("no moderation runs on this device"),
        "prediction": Refused("predicted outputs are not supported"),
        "prompt_cache_options": Refused(
            "the prompt cache is automatic (each request reuses the previous one's prefix) and has no options"
        ),
        "prompt_cache_retention": Refused(
            "the prompt cache is automatic (each request reuses the previous one's prefix); "
            "no retention can be set"
        ),
        "reasoning_effort": Refused(
            "the model does not reason in a separate phase; reasoning_effort is not supported"
        ),
        "service_tier": Refused(
            "this device has one service tier: only auto or default", accepts=("auto", "default")
        ),
        "verbosity": Refused("the model has no verbosity control"),
        "web_search_options": Refused("this device does not search the web"),
        "best_of": Refused(
            "only best_of=1 is supported: one completion is generated per request", accepts=(1,)
        ),
        "suffix": Refused("suffix (fill-in-the-middle) is not supported", accepts=("",)),
        "include_obfuscation": Refused(
            "stream chunks are not padded against network side channels here; omit it or send false",
            accepts=(False,),
        ),
    }
)

_LLAMA_ONLY = "; other runtimes refuse it with a 400"
_SAMPLING = "SamplingParams, applied by every runtime's sampler"
_IDENTIFIER = "accepted as an opaque end-user identifier, as OpenAI does: it never changes the output"

_SHARED: Final[Mapping[str, Disposition]] = {
    "model": Honoured("the model table: the model of that name, or a 404"),
    "frequency_penalty": Honoured(_SAMPLING),
    "presence_penalty": Honoured(_SAMPLING),
    "logit_bias": Honoured("SamplingParams.logit_bias, llama.cpp's sampler" + _LLAMA_ONLY),
    "max_tokens": Honoured("SamplingParams.max_tokens; beyond the context window: context_length_exceeded"),
    "n": Honoured("edgefleet.agent.api.choices: the choices generated one after another (at most 8)"),
    "seed": Honoured(_SAMPLING),
    "stop": Honoured("StopTextBuffer in every runtime's token loop"),
    "stream": Honoured("server-sent events (edgefleet.agent.api.sse)"),
    "stream_options": Honoured("include_usage: a trailing usage chunk; include_obfuscation=true is refused"),
    "temperature": Honoured(_SAMPLING),
    "top_p": Honoured(_SAMPLING),
    "user": Honoured(_IDENTIFIER),
}

CHAT: Final[Mapping[str, Disposition]] = MappingProxyType(
    {
        **_SHARED,
        "messages": Honoured(
            "the model's chat template (a message's name too); image, audio and file parts are refused"
        ),
        "audio": Refusal(example={"voice": "alloy", "format": "wav"}),
        "logprobs": Honoured("chat logprobs.content (llama.cpp's logits)" + _LLAMA_ONLY),
        "top_logprobs": Honoured("top_logprobs of each logprobs.content entry" + _LLAMA_ONLY),
        "max_completion_tokens": Honoured("SamplingParams.max_tokens (it supersedes max_tokens)"),
        "metadata": Refusal(example={"k": "v"}),
        "modalities": Refusal(example=["text", "audio"]),
        "moderation": Refusal(example={"policy": {}}),
        "prediction": Refusal(example={"type": "content", "content": "x"}),
        "prompt_cache_key": Honoured("one prompt cache per device, which every request already reuses"),
        "prompt_cache_options": Refusal(example={"mode": "explicit"}),
        "prompt_cache_retention": Refusal(example="24h"),
        "reasoning_effort": Refusal(example="low"),
        "safety_identifier": Honoured(_IDENTIFIER),
        "service_tier": Refusal(example="flex"),
        "store": Refusal(example=True),
        "verbosity": Refusal(example="low"),
        "web_search_options": Refusal(example={}),
        "tools": ToolsWork(),
        "tool_choice": ToolsWork(),
        "parallel_tool_calls": ToolsWork(),
        "response_format": ToolsWork(),
        "functions": ToolsWork(),
        "function_call": ToolsWork(),
    }
)

COMPLETIONS: Final[Mapping[str, Disposition]] = MappingProxyType(
    {
        **_SHARED,
        "prompt": Honoured("one text prompt (token arrays and several prompts are refused)"),
        "best_of": Refusal(example=2),
        "echo": Honoured("the prompt text ahead of the completion (echo with logprobs is refused)"),
        "logprobs": Honoured(
            "completion logprobs (tokens, token_logprobs, top_logprobs, text_offset)" + _LLAMA_ONLY
        ),
        "suffix": Refusal(example="tail"),
    }
)

EMBEDDINGS: Final[Mapping[str, Disposition]] = MappingProxyType(
    {
        "model": Honoured("the model table: the model of that name, or a 404"),
        "input": Honoured("Runtime.embed (text; token arrays are refused)"),
        "dimensions": Honoured("the model's own size only; any other is refused"),
        "encoding_format": Honoured("float or base64 (little-endian float32)"),
        "user": Honoured(_IDENTIFIER),
    }
)

EXTENSIONS: Final[Mapping[str, str]] = MappingProxyType(
    {"top_k": "chat and completions: SamplingParams.top_k (0 or -1: no cut), as vLLM and llama.cpp's server"}
)
