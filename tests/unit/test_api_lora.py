"""The API's side of LoRA adapters (fakes stand in for runtimes): ``<model>:<adapter>`` reaches the
runtime as SamplingParams.lora on that request only, is answered and counted under its own name,
is listed with its model as parent, and is refused where an adapter cannot apply."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from edgefleet.agent.api import create_app
from edgefleet.agent.api.admission import AdmissionQueue
from edgefleet.agent.api.errors import APIError
from edgefleet.agent.api.limits import RequestLimits
from edgefleet.agent.api.serving_chat import ServingChat
from edgefleet.agent.runtimes.base import LoraRequest
from edgefleet.agent.runtimes.model_table import ModelTable
from tests.unit.test_api import FakeRuntime, Recorder
from tests.unit.test_model_table_lora import FakeLoraRuntime

QUESTION = [{"role": "user", "content": "hi"}]


@pytest.fixture
def smol() -> FakeLoraRuntime:
    return FakeLoraRuntime("smol", "style")


@pytest.fixture
def recorder() -> Recorder:
    return Recorder()


@pytest.fixture
def client(smol: FakeLoraRuntime, recorder: Recorder) -> Iterator[TestClient]:
    with TestClient(
        create_app(models=ModelTable(smol, FakeRuntime(model_id="plain")), observer=recorder)
    ) as c:
        yield c


def test_the_adapter_reaches_the_runtime_for_its_request_only(
    client: TestClient, smol: FakeLoraRuntime, recorder: Recorder
) -> None:
    styled = client.post("/v1/chat/completions", json={"model": "smol:style", "messages": QUESTION})
    assert styled.status_code == 200 and styled.json()["model"] == "smol:style"
    assert smol.generations[-1].params.lora == LoraRequest("style")
    base = client.post("/v1/chat/completions", json={"model": "smol", "messages": QUESTION})
    assert base.json()["model"] == "smol" and smol.generations[-1].params.lora is None
    completed = client.post("/v1/completions", json={"model": "smol:style", "prompt": "hi", "stream": True})
    assert completed.status_code == 200 and '"model":"smol:style"' in completed.text
    assert smol.generations[-1].params.lora == LoraRequest("style")
    generated = client.post("/api/generate", json={"model": "smol:style", "prompt": "hi", "stream": False})
    assert generated.json()["model"] == "smol:style"
    assert smol.generations[-1].params.lora == LoraRequest("style")
    responded = client.post("/v1/responses", json={"model": "smol:style", "input": "hi"})
    assert responded.status_code == 200 and responded.json()["model"] == "smol:style"
    assert smol.generations[-1].params.lora == LoraRequest("style")
    assert [stats.model for stats in recorder.stats] == ["smol:style", "smol"] + ["smol:style"] * 3


def test_unknown_adapters_are_not_found(client: TestClient, recorder: Recorder) -> None:
    for name in ("smol:nope", "plain:style"):
        refused = client.post("/v1/chat/completions", json={"model": name, "messages": QUESTION})
        assert refused.status_code == 404
        error = refused.json()["error"]
        assert error["code"] == "model_not_found"
        assert "`smol:style`" in error["message"] and "`plain`" in error["message"]
    assert client.post("/api/chat", json={"model": "smol:nope", "messages": QUESTION}).status_code == 404


def test_embeddings_never_apply_an_adapter(client: TestClient, smol: FakeLoraRuntime) -> None:
    refused = client.post("/v1/embeddings", json={"model": "smol:style", "input": "hi"})
    assert refused.status_code == 400
    assert refused.json()["error"]["code"] == "adapter_not_supported"
    assert client.post("/api/embed", json={"model": "smol:style", "input": "hi"}).status_code == 400
    assert smol.embedded == []


def test_an_adapter_over_a_runtime_without_lora_is_a_clear_refusal() -> None:
    plain = FakeRuntime(model_id="plain")
    serving = ServingChat(
        models=ModelTable(plain), queue=AdmissionQueue(), observer=Recorder(), limits=RequestLimits()
    )
    with pytest.raises(APIError) as refused:
        serving._check(plain, LoraRequest("style"))
    assert refused.value.status == 400
    assert "cannot apply LoRA adapters" in refused.value.info.message


def test_listings_name_the_adapter_and_its_model(client: TestClient) -> None:
    cards = {card["id"]: card for card in client.get("/v1/models").json()["data"]}
    assert list(cards) == ["plain", "smol", "smol:style"]
    assert cards["smol:style"]["parent"] == "smol" and cards["smol"]["parent"] is None
    assert client.get("/v1/models/smol:style").json()["parent"] == "smol"
    assert client.get("/v1/models/smol:nope").status_code == 404
    tags = {model["name"]: model for model in client.get("/api/tags").json()["models"]}
    assert tags["smol:style"]["details"]["parent_model"] == "smol"
    assert "parent_model" not in tags["smol"]["details"] or not tags["smol"]["details"]["parent_model"]
    running = [model["name"] for model in client.get("/api/ps").json()["models"]]
    assert running == ["plain", "smol", "smol:style"]
    shown = client.post("/api/show", json={"model": "smol:style"}).json()
    assert shown["details"]["parent_model"] == "smol" and "ADAPTER style.gguf" in shown["modelfile"]


def test_metrics_list_each_adapter_over_its_model(client: TestClient, smol: FakeLoraRuntime) -> None:
    lines = [line for line in client.get("/metrics").text.splitlines() if line.startswith("edgefleet_lora")]
    assert lines == ['edgefleet_lora_adapter_bytes{adapter="style",model="smol"} 1.0']
    smol.unload_lora("style")
    assert "edgefleet_lora_adapter_bytes{" not in client.get("/metrics").text
