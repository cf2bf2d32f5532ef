"""A real agent API serving the real SmolLM2 GGUF, for the official `openai` client's tests of
tools, structured output and the Responses API (built from tests.integration.api_server)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import openai
import pytest

from edgefleet.agent.api import create_app
from edgefleet.agent.runtimes.base import Runtime
from edgefleet.agent.runtimes.model_table import ModelTable
from tests.integration.api_server import MODEL_ID, Recorder, loaded_smollm2, serving

__all__ = ["GET_TIME", "MODEL_ID", "openai_client", "smollm2_runtime"]

# A second tool beside each test's weather tool, so a call must pick the right one.
GET_TIME: Any = {
    "type": "function",
    "function": {
        "name": "get_time",
        "description": "Current local time in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 40}},
            "required": ["city"],
            "additionalProperties": False,
        },
    },
}


@pytest.fixture(scope="module")
def smollm2_runtime() -> Iterator[Runtime]:
    with loaded_smollm2(n_ctx=2048) as loaded:
        yield loaded


@pytest.fixture(scope="module")
def openai_client(smollm2_runtime: Runtime) -> Iterator[openai.OpenAI]:
    app = create_app(models=ModelTable(smollm2_runtime), observer=Recorder())
    with serving(app) as base_url:
        yield openai.OpenAI(base_url=f"{base_url}/v1", api_key="not-needed", max_retries=0, timeout=120)
