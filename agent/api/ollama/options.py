"""Ollama's `options` object, checked and mapped onto the runtime's SamplingParams.

Ollama clients set sampling through Modelfile parameter names (`temperature`, `num_predict`,
`repeat_penalty`, ...). Each name this device knows falls in one of four groups:

- mapped: turned into the SamplingParams field that means the same (`num_predict` is
  `max_tokens`, `-1`/`-2` meaning "until the window is full"; a negative `seed` is a fresh
  random one, as in Ollama); `num_ctx` is accepted up to the window the fleet loaded the model
  with (a request then gets at least the window it asked for) and refused beyond it;
- neutral only: knobs the runtimes do not turn (`repeat_penalty`, `typical_p`, `tfs_z`,
  `mirostat`), accepted only at the value that switches them off, which is what happens;
- fleet: load-time settings (`num_thread`, `num_gpu`, `use_mmap`, ...) that the fleet's
  device config decides for every request alike, so no request may set them;
- unsupported: samplers no runtime here implements (`min_p`, `num_keep`, ...).

Anything else, and any value of a wrong type, is refused: an option that cannot be honoured
answers 400 rather than being ignored the way Ollama ignores it. A null value is an absent one
(Ollama skips nulls too). Omitted options take Ollama's defaults where the runtime has the
knob (temperature 0.8, top_p 0.9, top_k 40); `/openapi.json` states all of this in the schema.
"""

from __future__ import annotations

from types import MappingProxyType
from typing import Annotated, Any, Final

from pydantic import BeforeValidator, ConfigDict, Field, model_validator

from edgefleet.agent.api.protocol import (
    MAX_STOP_CHARS,
    MAX_STOP_SEQUENCES,
    MAX_TOKENS,
    Integer,
    OpenAIRequestModel,
    PositiveInteger,
    _integral,
)
from edgefleet.agent.runtimes.base import SamplingParams

# Bounds inside Annotated, ahead of the validator, so the JSON schema states them too
Count = Annotated[int, Field(ge=0, le=MAX_TOKENS), BeforeValidator(_integral)]
SEED_MASK = 0xFFFF_FFFF  # runtimes take 32-bit seeds

# Ollama's defaults for the knobs the runtimes have (api/types.go DefaultOptions).
DEFAULT_TEMPERATURE = 0.8
DEFAULT_TOP_P = 0.9
DEFAULT_TOP_K = 40

UNLIMITED = (-1, -2)  # num_predict: no limit, or until the context is full: both end at the window

# Neutral values: the option is accepted only at the value that turns it off.
NEUTRAL: Final = MappingProxyType({"repeat_penalty": 1.0, "typical_p": 1.0, "tfs_z": 1.0, "mirostat": 0})

FLEET_SET: Final = frozenset(
    {
        "numa",
        "num_batch",
        "num_gpu",
        "main_gpu",
        "low_vram",
        "f16_kv",
        "logits_all",
        "vocab_only",
        "use_mmap",
        "use_mlock",
        "num_thread",
        "embedding_only",
    }
)
UNSUPPORTED: Final = frozenset(
    {"num_keep", "min_p", "repeat_last_n", "mirostat_tau", "mirostat_eta", "penalize_newline"}
)

_NULL_ONLY: dict[str, Any] = {"anyOf": [{"type": "null"}]}


def _neutral(value: float) -> dict[str, Any]:
    return {"anyOf": [{"const": value}, {"type": "null"}]}


class OptionRefused(ValueError):
    """An option this device cannot honour; `option` names it."""

    def __init__(self, option: str, message: str) -> None:
        self.option = option
        super().__init__(message)


class OllamaOptions(OpenAIRequestModel):
    """The `options` of /api/chat, /api/generate and /api/embed (see the module docstring)."""

    # mapped
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, ge=0.0, le=1.0)
    top_k: Count | None = None
    seed: Integer | None = None  # negative: a fresh random seed, as in Ollama
    num_predict: Integer | None = Field(
        default=None,
        ge=-2,
        le=MAX_TOKENS,
        json_schema_extra={
            "anyOf": [
                {"type": "integer", "minimum": -2, "maximum": MAX_TOKENS, "not": {"const": 0}},
                {"type": "null"},
            ]
        },
    )
    stop: list[str] | None = Field(
        default=None,
        json_schema_extra={
            "anyOf": [
                {
                    "type": "array",
                    "items": {"type": "string", "maxLength": MAX_STOP_CHARS},
                    "maxItems": MAX_STOP_SEQUENCES,
                },
                {"type": "null"},
            ]
        },
    )
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    num_ctx: PositiveInteger | None = None
    # neutral only
    repeat_penalty: float | None = Field(default=None, json_schema_extra=_neutral(1.0))
    typical_p: float | None = Field(default=None, json_schema_extra=_neutral(1.0))
    tfs_z: float | None = Field(default=None, json_schema_extra=_neutral(1.0))
    mirostat: Integer | None = Field(default=None, json_schema_extra=_neutral(0))
    # set by the fleet, and unsupported: only null (absent) is accepted
    numa: bool | None = Field(default=None, json_schema_extra=_NULL_ONLY)
    num_batch: Integer | None = Field(default=None, json_schema_extra=_NULL_ONLY)
    num_gpu: Integer | None = Field(default=None, json_schema_extra=_NULL_ONLY)
    main_gpu: Integer | None = Field(default=None, json_schema_extra=_NULL_ONLY)
    low_vram: bool | None = Field(default=None, json_schema_extra=_NULL_ONLY)
    f16_kv: bool | None = Field(default=None, json_schema_extra=_NULL_ONLY)
    logits_all: bool | None = Field(default=None, json_schema_extra=_NULL_ONLY)
    vocab_only: bool | None = Field(default=None, json_schema_extra=_NULL_ONLY)
    use_mmap: bool | None = Field(default=None, json_schema_extra=_NULL_ONLY)
    use_mlock: bool | None = Field(default=None, json_schema_extra=_NULL_ONLY)
    num_thread: Integer | None = Field(default=None, json_schema_extra=_NULL_ONLY)
    embedding_only: bool | None = Field(default=None, json_schema_extra=_NULL_ONLY)
    num_keep: Integer | None = Field(default=None, json_schema_extra=_NULL_ONLY)
    min_p: float | None = Field(default=None, json_schema_extra=_NULL_ONLY)
    repeat_last_n: Integer | None = Field(default=None, json_schema_extra=_NULL_ONLY)
    mirostat_tau: float | None = Field(default=None, json_schema_extra=_NULL_ONLY)
    mirostat_eta: float | None = Field(default=None, json_schema_extra=_NULL_ONLY)
    penalize_newline: bool | None = Field(default=None, json_schema_extra=_NULL_ONLY)

    model_config = ConfigDict(strict=True, extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _known_names(cls, data: Any) -> Any:
        """An unknown name is refused by name (pydantic alone would only say "extra input")."""
        if isinstance(data, dict):
            unknown = sorted(str(name) for name in data if name not in cls.model_fields)
            if unknown:
                raise OptionRefused(unknown[0], f"unknown option {unknown[0]!r}")
        return data

    @model_validator(mode="after")
    def _honourable(self) -> OllamaOptions:
        for name in sorted(self.model_fields_set):
            value = getattr(self, name)
            if value is None:
                continue
            if name in FLEET_SET:
                raise OptionRefused(
                    name,
                    f"option {name!r} is set by the fleet's configuration of this device, not per request",
                )
            if name in UNSUPPORTED:
                raise OptionRefused(name, f"option {name!r} is not supported on this device")
            neutral = NEUTRAL.get(name)
            if neutral is not None and value != neutral:
                raise OptionRefused(
                    name, f"option {name!r} can only be {neutral!r} here (the runtime has no such sampler)"
                )
        if self.num_predict == 0:
            raise OptionRefused(
                "num_predict", "num_predict must be positive, or -1 (no limit) or -2 (fill the context)"
            )
        if self.stop is not None:
            if len(self.stop) > MAX_STOP_SEQUENCES:
                raise OptionRefused("stop", f"at most {MAX_STOP_SEQUENCES} stop sequences are allowed")
            if any(len(stop) > MAX_STOP_CHARS for stop in self.stop):
                raise OptionRefused("stop", f"stop sequences may be at most {MAX_STOP_CHARS} characters long")
        return self

    def max_tokens(self) -> int | None:
        if self.num_predict is None or self.num_predict in UNLIMITED:
            return None
        return self.num_predict

    def sampling_params(self) -> SamplingParams:
        """The runtime's parameters: the values sent, else Ollama's defaults."""
        seed = self.seed
        return SamplingParams(
            max_tokens=self.max_tokens(),
            temperature=DEFAULT_TEMPERATURE if self.temperature is None else self.temperature,
            top_p=DEFAULT_TOP_P if self.top_p is None else self.top_p,
            top_k=DEFAULT_TOP_K if self.top_k is None else self.top_k,
            seed=None if seed is None or seed < 0 else seed & SEED_MASK,
            stop=tuple(self.stop or ()),
            frequency_penalty=self.frequency_penalty or 0.0,
            presence_penalty=self.presence_penalty or 0.0,
        )

    def check_window(self, n_ctx: int) -> None:
        """Refuse a `num_ctx` beyond the window the model was loaded with."""
        if self.num_ctx is not None and self.num_ctx > n_ctx:
            raise WindowTooSmall(requested=self.num_ctx, n_ctx=n_ctx)


class WindowTooSmall(OptionRefused):
    """`num_ctx` asks for more context than the model was loaded with."""

    def __init__(self, *, requested: int, n_ctx: int) -> None:
        self.requested = requested
        self.n_ctx = n_ctx
        super().__init__(
            "num_ctx",
            f"num_ctx {requested} exceeds this model's context window of {n_ctx} tokens, which the "
            f"fleet's configuration of this device sets; send num_ctx <= {n_ctx} or omit it",
        )
