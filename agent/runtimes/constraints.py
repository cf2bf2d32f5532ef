"""Constrained decoding: grammars built from JSON schemas (or Lark/GBNF text) and enforced token
by token, so structured output always parses and forced tool calls are always well formed.

Engine: llguidance (PyPI ``llguidance``). It was chosen over xgrammar and outlines-core because
one engine then serves every runtime: it builds its tokenizer straight from a llama.cpp vocab
(``llguidance.llamacpp``), from a Hugging Face ``tokenizers`` file (ONNX Runtime) and has MLX
and numpy mask helpers, while xgrammar needs a Hugging Face tokenizer and outlines-core builds
a full token-level automaton per schema up front (seconds for a nested schema on a 49k vocab).
llguidance computes each token's mask lazily from a lexer and an Earley parser, typically in
well under a millisecond, which is small next to a decode step (SmolLM2-135M: ~10 ms on two
cores); bench.serving reports the measured ratio. It also reads Lark and llama.cpp's GBNF
grammars and takes Lark grammars with inline JSON schemas (``%json {...}``), which is how
forced tool calls are written (edgefleet.agent.api.tool_calls).

The llama.cpp runtime hooks it in here (``LlamaGuidance``): its logits go through a
llama-cpp-python logits processor that sets every token the grammar forbids to -inf. ONNX
Runtime and MLX build the engine's tokenizer from their ``tokenizers`` JSON and add the mask
to their logits as a 0/-inf row (runtimes.grammar_mask). A runtime that does not say
``constrained_decoding`` in its description gets constrained requests refused with a 400
instead of the constraint being ignored.

JSON is generated compactly (``", "`` and ``": "`` separators, no free whitespace): a small
model allowed free whitespace inside JSON tends to emit newlines until it runs out of tokens.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from edgefleet.agent.runtimes.base import Constraint, ConstraintError

if TYPE_CHECKING:  # numpy is imported where a guide is made: the agent's API imports this module
    import numpy as np
    import numpy.typing as npt

MAX_SCHEMA_BYTES = 64 * 1024  # a schema's JSON text
MAX_SCHEMA_DEPTH = 24  # nested objects/arrays inside a schema
MAX_GRAMMAR_BYTES = 64 * 1024  # a Lark/GBNF grammar sent as an extension field

# JSON layout the compiler emits (see the module docstring).
_COMPACT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


def _llguidance() -> Any:
    try:
        import llguidance
    except ImportError as exc:  # pragma: no cover - part of the agent extra
        raise ConstraintError("constrained decoding needs llguidance (install edgefleet[agent])") from exc
    return llguidance


def check_schema_size(schema: Any, *, what: str = "schema") -> None:
    """Bound a schema before any compiler sees it: its JSON size and its nesting depth."""
    text = json.dumps(schema, separators=(",", ":"))
    if len(text.encode()) > MAX_SCHEMA_BYTES:
        raise ConstraintError(f"the {what} is larger than {MAX_SCHEMA_BYTES} bytes")
    stack: list[tuple[Any, int]] = [(schema, 1)]
    while stack:
        value, depth = stack.pop()
        if depth > MAX_SCHEMA_DEPTH:
            raise ConstraintError(f"the {what} is nested deeper than {MAX_SCHEMA_DEPTH} levels")
        if isinstance(value, dict):
            stack.extend((item, depth + 1) for item in value.values())
        elif isinstance(value, list):
            stack.extend((item, depth + 1) for item in value)


def json_compile_options() -> dict[str, Any]:
    """Compiler options. Not lenient: a schema keyword the engine cannot enforce (``not``,
    ``uniqueItems``, ``if``/``then``, ...) is refused, naming it, rather than ignored, so what
    is generated always validates against the schema as sent, ``strict`` or not (OpenAI's
    strict mode is what every schema gets here)."""
    return {**_COMPACT, "lenient": False}


def json_schema_grammar(schema: dict[str, Any] | None) -> str:
    """The grammar for ``schema`` (None: any JSON object), validated; raises ConstraintError."""
    if schema is None:
        schema = {"type": "object"}
    check_schema_size(schema)
    llguidance = _llguidance()
    try:
        grammar = str(
            llguidance.LLMatcher.grammar_from_json_schema(
                json.dumps(schema), overrides=json_compile_options()
            )
        )
    except ValueError as exc:
        raise ConstraintError(f"the JSON schema cannot be compiled: {exc}") from exc
    return validated(grammar)


def lark_grammar(text: str, *, gbnf: bool = False) -> str:
    """A Lark grammar (or llama.cpp GBNF with ``gbnf``), validated; raises ConstraintError."""
    if len(text.encode()) > MAX_GRAMMAR_BYTES:
        raise ConstraintError(f"the grammar is larger than {MAX_GRAMMAR_BYTES} bytes")
    llguidance = _llguidance()
    try:
        grammar = str(llguidance.grammar_from("gbnf" if gbnf else "lark", text))
    except ValueError as exc:
        raise ConstraintError(f"the grammar cannot be compiled: {exc}") from exc
    return validated(grammar)


def validated(grammar: str) -> str:
    """``grammar`` if the engine compiles it (without a tokenizer: no model needed yet)."""
    llguidance = _llguidance()
    message = str(llguidance.LLMatcher.validate_grammar(grammar))
    if message:
        raise ConstraintError(f"the constraint cannot be compiled: {message}")
    return grammar


class LlamaGuidance:
    """llguidance's tokenizer for one llama.cpp vocabulary, built on first use (about a second
    for a 49k vocabulary) and kept with the runtime. Called on the llama thread only."""

    def __init__(self, llama_cpp: Any, vocab: Any, *, end_tokens: Sequence[int]) -> None:
        self._lib = llama_cpp
        self._vocab = vocab
        self._end_tokens = [token for token in end_tokens if token >= 0]
        self._tokenizer: Any = None

    def start(self, constraint: Constraint) -> LlamaGuide:
        """A matcher at the grammar's start; raises ConstraintError if it does not compile."""
        llguidance = _llguidance()
        if self._tokenizer is None:
            import llguidance.llamacpp

            with warnings.catch_warnings():  # it reads token attributes through a deprecated alias
                warnings.simplefilter("ignore", DeprecationWarning)
                self._tokenizer = llguidance.llamacpp.lltokenizer_from_vocab(
                    self._vocab, eos_token=self._end_tokens or None
                )
        matcher = llguidance.LLMatcher(self._tokenizer, constraint.grammar, log_level=0)
        if matcher.is_error():
            raise ConstraintError(f"the constraint cannot be compiled: {matcher.get_error()}")
        return LlamaGuide(matcher, vocab_size=int(self._tokenizer.vocab_size))


class LlamaGuide:
    """One generation's grammar state: masks the logits before each sample, then follows the
    token sampled."""

    def __init__(self, matcher: Any, *, vocab_size: int) -> None:
        self._matcher = matcher
        self._vocab_size = vocab_size
        import numpy

        self._np = numpy
        self._mask = numpy.zeros((vocab_size + 31) // 32, dtype=numpy.int32)
        self._pointer = int(self._mask.ctypes.data)
        self._nbytes = int(self._mask.nbytes)

    @property
    def processors(self) -> list[Callable[[npt.NDArray[Any], npt.NDArray[np.single]], Any]]:
        """llama-cpp-python's ``logits_processor`` list."""
        return [self._apply]

    def _apply(self, input_ids: npt.NDArray[Any], scores: npt.NDArray[np.single]) -> npt.NDArray[np.single]:
        np = self._np
        self._matcher.unsafe_compute_mask_ptr(self._pointer, self._nbytes)
        allowed = np.unpackbits(self._mask.view(np.uint8), bitorder="little")
        size = min(len(scores), self._vocab_size)
        forbidden = allowed[:size] == 0
        np.putmask(scores[:size], forbidden, -np.inf)
        if len(scores) > size:  # tokens the engine does not know (padding rows)
            scores[size:] = -np.inf
        return scores

    def advance(self, token: int) -> bool:
        """Follow the sampled token; True once the grammar is complete (only an end may follow)."""
        if not self._matcher.consume_token(token):
            raise ConstraintError(f"the constraint failed: {self._matcher.get_error()}")
        return bool(self._matcher.is_stopped())
