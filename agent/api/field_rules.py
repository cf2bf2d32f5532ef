"""Two field rules the request models share: a null that means the default, and a refusal.

OpenAI's API takes ``null`` for every optional field and reads it as "not sent" (the
``openai`` package sends ``n: null`` when the caller passes ``n=None``). `NullMeansDefault`
turns a null into the field's default before validation, so the attribute keeps its plain
type (``stream`` stays a ``bool``), and adds ``null`` to the field's JSON schema.

`Refused` is for a field this API does not honour: the request is refused with a 400 that
names the field and says why, unless the value is one that asks for nothing (null, or the
``accepts`` values such as ``store: false``), instead of being accepted and ignored. Its
JSON schema lists exactly the values that are accepted, so /openapi.json (and the fuzzer
that trusts it) agree with what the API does.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from pydantic import GetCoreSchemaHandler, GetJsonSchemaHandler
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import core_schema


@dataclass(frozen=True, slots=True)
class NullMeansDefault:
    """``Annotated[bool, NullMeansDefault(False)]``: null validates as ``False``."""

    default: Any

    def __get_pydantic_core_schema__(
        self, source: Any, handler: GetCoreSchemaHandler
    ) -> core_schema.CoreSchema:
        default = self.default

        def fill(value: Any) -> Any:
            return default if value is None else value

        return core_schema.no_info_before_validator_function(fill, handler(source))

    def __get_pydantic_json_schema__(
        self, schema: core_schema.CoreSchema, handler: GetJsonSchemaHandler
    ) -> JsonSchemaValue:
        inner = handler(schema)
        return {"anyOf": [inner, {"type": "null"}]}


@dataclass(frozen=True, slots=True)
class Refused:
    """``Annotated[Any, Refused("why")] = None``: anything but null (or ``accepts``) is a 400."""

    reason: str
    accepts: Sequence[Any] = field(default=())

    def allows(self, value: Any) -> bool:
        return value is None or any(type(value) is type(ok) and value == ok for ok in self.accepts)

    def __get_pydantic_core_schema__(
        self, source: Any, handler: GetCoreSchemaHandler
    ) -> core_schema.CoreSchema:
        def check(value: Any) -> Any:
            if not self.allows(value):
                raise ValueError(self.reason)
            return value

        return core_schema.no_info_plain_validator_function(check)

    def __get_pydantic_json_schema__(
        self, schema: core_schema.CoreSchema, handler: GetJsonSchemaHandler
    ) -> JsonSchemaValue:
        return {"enum": [None, *self.accepts], "description": f"Refused unless null: {self.reason}."}


@dataclass(frozen=True, slots=True)
class TokenBiases:
    """``logit_bias``: ``{"token id": bias}``, ids as decimal strings, biases within [-100, 100]
    (OpenAI's rule), at most ``max_entries`` of them (each is applied at every token)."""

    max_entries: int

    def __get_pydantic_core_schema__(
        self, source: Any, handler: GetCoreSchemaHandler
    ) -> core_schema.CoreSchema:
        return core_schema.no_info_after_validator_function(self._check, handler(source))

    def __get_pydantic_json_schema__(
        self, schema: core_schema.CoreSchema, handler: GetJsonSchemaHandler
    ) -> JsonSchemaValue:
        biases = {
            "type": "object",
            "propertyNames": {"pattern": "^[0-9]{1,10}$"},
            "additionalProperties": {"type": "number", "minimum": -100, "maximum": 100},
            "maxProperties": self.max_entries,
        }
        return {"anyOf": [biases, {"type": "null"}]}

    def _check(self, value: dict[str, float] | None) -> dict[str, float] | None:
        if value is None:
            return None
        if len(value) > self.max_entries:
            raise ValueError(f"at most {self.max_entries} token biases are allowed")
        for key, bias in value.items():
            if not (key.isascii() and key.isdigit() and len(key) <= 10):
                raise ValueError(f"keys are token ids written as decimal strings, not {key!r}")
            if not -100 <= bias <= 100:
                raise ValueError(f"the bias of token {key} is {bias}; biases are between -100 and 100")
        return value
