"""A real agent API serving the real SmolLM2 GGUF, for the official `openai` client's tests of
tools, structured output and the Responses API (the fixture approach of test_openai_client)."""

from __future__ import annotations

from collections.abc import Iterator

import openai
import pytest

from edgefleet.agent.api import create_app
from edgefleet.agent.runtimes import load_runtime
from edgefleet.agent.runtimes.base import Runtime
from edgefleet.agent.runtimes.model_table import ModelTable
from edgefleet.protos.fleet.v1 import common_pb2
from tests.integration.test_openai_client import MODEL_ID, Recorder, serving, smollm2_file

__all__ = ["MODEL_ID", "openai_client", "smollm2_runtime"]


@pytest.fixture(scope="module")
def smollm2_runtime() -> Iterator[Runtime]:
    loaded = load_runtime(
        fmt=common_pb2.MODEL_FORMAT_GGUF, model_path=smollm2_file(), model_id=MODEL_ID, n_ctx=2048
    )
    try:
        yield loaded
    finally:
        loaded.unload()


@pytest.fixture(scope="module")
def openai_client(smollm2_runtime: Runtime) -> Iterator[openai.OpenAI]:
    app = create_app(models=ModelTable(smollm2_runtime), observer=Recorder())
    with serving(app) as base_url:
        yield openai.OpenAI(base_url=f"{base_url}/v1", api_key="not-needed", max_retries=0, timeout=120)
