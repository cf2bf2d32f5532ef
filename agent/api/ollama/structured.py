"""Ollama's `format` ("json", or a JSON schema) as a decoding constraint, through the grammar
engine the OpenAI side's response_format uses (edgefleet.agent.api.chat_plan.OutputFormat).

The grammar is compiled before the request takes a queue slot, so a schema the engine cannot
compile is a 400 (code invalid_schema) that costs the model nothing; a model whose runtime
cannot constrain its decoding is refused (400) rather than asked to ignore the format.
"""

from __future__ import annotations

from typing import Any

from edgefleet.agent.api.chat_plan import OutputFormat
from edgefleet.agent.api.errors import APIError
from edgefleet.agent.runtimes.base import Constraint, RuntimeDescription

PARAM = "format"


def format_constraint(value: str | dict[str, Any] | None) -> Constraint | None:
    """The constraint `format` asks for (None: free text); raises APIError naming `format`."""
    if not value:
        return None
    schema = value if isinstance(value, dict) else None  # "json": any JSON object
    return Constraint(OutputFormat(json=True, schema=schema).compile(PARAM))


def check_runtime(description: RuntimeDescription) -> None:
    """Refuse a format the runtime would have to ignore."""
    if not description.constrained_decoding:
        raise APIError(
            400,
            f"format: the {description.runtime} runtime serving {description.model_id} cannot "
            "constrain its output, which JSON mode and JSON schemas need",
            param=PARAM,
            code="constrained_decoding_not_supported",
        )
