"""How much one request may ask of the device, checked before it costs anything.

A small device has one inference slot: a request that is refused only after its body was
buffered whole, or after its prompt was tokenized, has already taken that slot (or the
event loop) from everyone else. So the body is bounded in bytes (while it is read) and in
time, its JSON in nesting depth, and the parsed request in characters and item counts, all
before the request is queued for the model. Each refusal is a typed exception naming the
setting it hit; edgefleet.agent.api.errors maps them to OpenAI error bodies.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from itertools import accumulate

from edgefleet.agent.api.protocol import MAX_EMBEDDING_INPUTS


@dataclass(frozen=True, slots=True)
class RequestLimits:
    """Bounds on one API request; the defaults suit a small edge device serving a small model."""

    max_body_bytes: int = 4 * 2**20  # a full context of text, JSON-escaped, fits many times over
    max_prompt_chars: int = 256 * 2**10  # messages, prompt or embedding inputs, all together
    max_messages: int = 1024  # more turns than a small model's context holds
    max_embedding_inputs: int = MAX_EMBEDDING_INPUTS
    max_json_depth: int = 64  # requests nest 5 deep; tool schemas a client may add, a few more
    body_timeout_seconds: float = 60.0  # to receive the whole body once the headers are in

    def __post_init__(self) -> None:
        for name in ("max_body_bytes", "max_prompt_chars", "max_messages", "max_embedding_inputs"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        if self.max_embedding_inputs > MAX_EMBEDDING_INPUTS:
            raise ValueError(f"max_embedding_inputs must be at most {MAX_EMBEDDING_INPUTS}")
        if self.max_json_depth < 8:
            raise ValueError("max_json_depth must be at least 8 (requests themselves nest 5 deep)")
        if not self.body_timeout_seconds > 0:
            raise ValueError("body_timeout_seconds must be positive")

    def check_count(self, param: str, count: int, *, limit: int, setting: str) -> None:
        """Refuse more than `limit` items in `param` (`setting` is the limit's name)."""
        if count > limit:
            raise TooManyItems(
                f"{param}: {count} items sent, at most {limit} are allowed ({setting})", param=param
            )

    def check_chars(self, param: str, texts: Iterable[str]) -> None:
        """Refuse texts longer than max_prompt_chars together; counting stops at the limit."""
        total = 0
        for text in texts:
            total += len(text)
            if total > self.max_prompt_chars:
                raise PromptTooLarge(
                    f"{param}: the text sent exceeds {self.max_prompt_chars} characters (max_prompt_chars)",
                    param=param,
                )


class RequestLimitExceeded(Exception):
    """A request beyond one of the RequestLimits; `param` is the field at fault, if one is."""

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class BodyTooLarge(RequestLimitExceeded):
    """The body is (or announces itself as) larger than max_body_bytes."""

    @classmethod
    def over(cls, limit: int) -> BodyTooLarge:
        return cls(f"request body exceeds {limit} bytes (max_body_bytes)")


class BodyTimeout(RequestLimitExceeded):
    """The body did not arrive within body_timeout_seconds."""

    @classmethod
    def after(cls, seconds: float) -> BodyTimeout:
        return cls(f"request body not received within {seconds:g}s (body_timeout_seconds)")


class JSONTooDeep(RequestLimitExceeded):
    """The JSON body nests deeper than max_json_depth."""


class PromptTooLarge(RequestLimitExceeded):
    """The text to tokenize exceeds max_prompt_chars."""


class TooManyItems(RequestLimitExceeded):
    """A list field holds more items than its limit."""


# A JSON string, escapes included. An unterminated one runs to the end of the body, so every
# quote starts a match and the scan stays linear whatever the input.
_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*(?:"|\\?\Z)', re.DOTALL)
_OPENERS = b"[{"
_CLOSERS = b"]}"
# Brackets become +1 / -1 (as signed bytes); every other byte is deleted.
_BRACKET_STEPS = bytes.maketrans(_OPENERS + _CLOSERS, b"\x01\x01\xff\xff")
_NOT_BRACKETS = bytes(b for b in range(256) if b not in _OPENERS + _CLOSERS)


def json_depth(body: bytes) -> int:
    """How deeply the arrays and objects in a JSON text nest (brackets inside strings don't count).

    Runs on the raw bytes with C-speed primitives (regex, translate, accumulate) so a
    hostile body costs milliseconds and never reaches a recursive parser; the count is exact
    for valid JSON and an upper bound of the nesting a parser would meet for invalid JSON.
    """
    steps = _JSON_STRING.sub(b"", body).translate(_BRACKET_STEPS, _NOT_BRACKETS)
    return max(accumulate(memoryview(steps).cast("b")), default=0)


def check_json_depth(body: bytes, limit: int) -> None:
    """Refuse a body nesting deeper than `limit`; cheap when it has few brackets at all."""
    if body.count(b"[") + body.count(b"{") <= limit:
        return
    depth = json_depth(body)
    if depth > limit:
        raise JSONTooDeep(
            f"request body nests {depth} levels deep, at most {limit} are allowed (max_json_depth)"
        )
