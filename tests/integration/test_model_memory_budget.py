"""Two real models on one device API under a budget that holds one at a time: a request naming
the unloaded one evicts the idle other and loads it; each answers correctly after every swap."""

from __future__ import annotations

from collections.abc import Iterator
from functools import partial
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from edgefleet.agent.api import create_app
from edgefleet.agent.runtimes import load_runtime
from edgefleet.agent.runtimes.keep_alive import KeepAliveRuntime
from edgefleet.agent.runtimes.memory_budget import MemoryBudget
from edgefleet.agent.runtimes.model_table import ModelTable
from edgefleet.protos.fleet.v1 import common_pb2
from tests.onnx_models import minilm_folder

MIB = 2**20
CHAT, EMBED = "smollm2", "minilm"


@pytest.fixture(scope="module")
def device(
    smollm2_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[TestClient, dict[str, KeepAliveRuntime]]]:
    budget = MemoryBudget(300 * MIB)  # either model fits; both do not (as counted below)
    loaders = {
        CHAT: partial(
            load_runtime, fmt=common_pb2.MODEL_FORMAT_GGUF, model_path=smollm2_path, model_id=CHAT, n_ctx=512
        ),
        EMBED: partial(
            load_runtime,
            fmt=common_pb2.MODEL_FORMAT_ONNX,
            model_path=minilm_folder(tmp_path_factory.mktemp("minilm")),
            model_id=EMBED,
            n_ctx=256,
        ),
    }
    runtimes = {}
    for name, load in loaders.items():
        first = budget.load(name=name, footprint_bytes=200 * MIB, factory=load)
        runtimes[name] = KeepAliveRuntime(
            first, reload=load, keep_alive_s=None, budget=budget, footprint_bytes=200 * MIB
        )
    app = create_app(models=ModelTable(*runtimes.values()), observer=lambda stats: None)
    with TestClient(app) as client:
        yield client, runtimes
    for runtime in runtimes.values():
        runtime.unload()


def chat(client: TestClient) -> str:
    response = client.post(
        "/v1/chat/completions",
        json={
            "model": CHAT,
            "messages": [{"role": "user", "content": "Hi"}],
            "max_tokens": 8,
            "temperature": 0,
        },
    )
    assert response.status_code == 200, response.text
    return str(response.json()["choices"][0]["message"]["content"])


def embed(client: TestClient) -> list[float]:
    response = client.post("/v1/embeddings", json={"model": EMBED, "input": "edge devices"})
    assert response.status_code == 200, response.text
    return list(response.json()["data"][0]["embedding"])


def loaded(client: TestClient) -> dict[str, float]:
    """edgefleet_model_loaded per model, from /metrics."""
    values = {}
    for line in client.get("/metrics").text.splitlines():
        if line.startswith("edgefleet_model_loaded{"):
            name = line.split('model="', 1)[1].split('"', 1)[0]
            values[name] = float(line.rsplit(" ", 1)[1])
    return values


def test_requests_swap_models_within_the_budget(
    device: tuple[TestClient, dict[str, KeepAliveRuntime]],
) -> None:
    client, runtimes = device
    assert not runtimes[CHAT].loaded and runtimes[EMBED].loaded  # loading minilm evicted smollm2
    first_vector = embed(client)
    first_reply = chat(client)  # evicts minilm, reloads smollm2
    assert loaded(client) == {CHAT: 1.0, EMBED: 0.0}
    assert embed(client) == pytest.approx(first_vector, abs=1e-6)  # reloaded: same model, same answer
    assert loaded(client) == {CHAT: 0.0, EMBED: 1.0}
    assert chat(client) == first_reply  # greedy: the reloaded model answers the same
    names = [m["id"] for m in client.get("/v1/models").json()["data"]]
    assert names == [EMBED, CHAT]  # both listed throughout (by name), loaded or not
