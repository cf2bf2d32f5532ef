"""GET /metrics: Prometheus text from a per-app registry, and who may read it."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from edgefleet.agent.api import create_app
from edgefleet.agent.api.auth import require_api_key
from edgefleet.agent.runtimes.model_table import ModelTable
from tests.unit.test_api import MODEL, FakeRuntime, chat_body, completion_body, stream

RELEASE = {"bundle": "smollm2", "version": "1.2.0", "variant": "q4_1-cpu"}


@pytest.fixture
def active() -> ModelTable:
    return ModelTable(FakeRuntime())


@pytest.fixture
def client(active: ModelTable) -> Iterator[TestClient]:
    app = create_app(
        models=active,
        observer=lambda stats: None,
        release_info=lambda model: RELEASE if model == MODEL else None,
    )
    with TestClient(app, raise_server_exceptions=False) as test_client:
        yield test_client


def scrape(client: TestClient) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


def value(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_requests_tokens_and_latency_are_counted(client: TestClient) -> None:
    client.post("/v1/chat/completions", json=chat_body(max_tokens=3))
    stream(client, "/v1/completions", completion_body(stream=True, max_tokens=4))
    client.post("/v1/chat/completions", json=chat_body(model="gpt-4o"))
    client.get("/v1/no-such-thing")
    samples = scrape(client)
    chat = "/v1/chat/completions"
    assert value(samples, "edgefleet_api_requests_total", endpoint=chat, status="200") == 1
    assert value(samples, "edgefleet_api_requests_total", endpoint=chat, status="404") == 1
    assert value(samples, "edgefleet_api_requests_total", endpoint="/v1/completions", status="200") == 1
    assert value(samples, "edgefleet_api_requests_total", endpoint="other", status="404") == 1
    assert value(samples, "edgefleet_api_prompt_tokens_total", endpoint=chat) == 6
    assert value(samples, "edgefleet_api_completion_tokens_total", endpoint=chat) == 3
    assert value(samples, "edgefleet_api_completion_tokens_total", endpoint="/v1/completions") == 4
    assert value(samples, "edgefleet_api_time_to_first_token_seconds_count", endpoint=chat) == 1
    assert value(samples, "edgefleet_api_decode_tokens_per_second_count", endpoint=chat) == 1
    assert value(samples, "edgefleet_api_request_duration_seconds_count", endpoint="/v1/completions") == 1
    assert value(samples, "edgefleet_api_errors_total", endpoint=chat, code="model_not_found") == 1


def test_validation_errors_are_counted_by_code(client: TestClient) -> None:
    client.post("/v1/chat/completions", json=chat_body(max_tokens=-1))
    samples = scrape(client)
    assert (
        value(samples, "edgefleet_api_errors_total", endpoint="/v1/chat/completions", code="invalid_value")
        == 1
    )
    assert value(samples, "edgefleet_api_requests_total", endpoint="/v1/chat/completions", status="400") == 1


def test_queue_depth_and_limits(client: TestClient) -> None:
    samples = scrape(client)
    assert value(samples, "edgefleet_api_queue_requests", state="running") == 0
    assert value(samples, "edgefleet_api_queue_requests", state="waiting") == 0
    assert value(samples, "edgefleet_api_queue_limit", state="running") == 1
    assert value(samples, "edgefleet_api_queue_limit", state="waiting") == 16
    assert ("edgefleet_api_queue_rejected_total", ()) in samples


def test_active_model_info_follows_swaps(client: TestClient, active: ModelTable) -> None:
    samples = scrape(client)
    info = {key: v for key, v in samples.items() if key[0] == "edgefleet_active_model_info"}
    ((_, labels),) = info
    assert dict(labels) == {
        "model": MODEL,
        "runtime": "fake",
        "format": "MODEL_FORMAT_GGUF",
        "device": "cpu",
        "capabilities": "chat,completions,embeddings",
        **RELEASE,
    }
    assert value(samples, "edgefleet_model_loaded", model=MODEL) == 1
    active.remove(MODEL)
    samples = scrape(client)
    assert not [key for key in samples if key[0] in ("edgefleet_active_model_info", "edgefleet_model_loaded")]


def test_each_app_has_its_own_registry(active: ModelTable) -> None:
    first = create_app(models=active, observer=lambda stats: None)
    second = create_app(models=active, observer=lambda stats: None)
    with TestClient(first) as one, TestClient(second) as two:
        one.post("/v1/chat/completions", json=chat_body())
        assert value(scrape(one), "edgefleet_api_prompt_tokens_total", endpoint="/v1/chat/completions") == 6
        assert value(scrape(two), "edgefleet_api_prompt_tokens_total", endpoint="/v1/chat/completions") == 0


def test_a_failing_release_probe_does_not_break_the_scrape(active: ModelTable) -> None:
    def broken(model: str) -> dict[str, str]:
        raise RuntimeError("state unavailable")

    with TestClient(create_app(models=active, observer=lambda stats: None, release_info=broken)) as client:
        samples = scrape(client)
    assert any(key[0] == "edgefleet_active_model_info" for key in samples)


def test_metrics_need_the_key_when_the_api_does(active: ModelTable) -> None:
    app = create_app(models=active, observer=lambda stats: None)
    require_api_key(app, "ef-secret")
    with TestClient(app) as client:
        refused = client.get("/metrics")
        assert refused.status_code == 401 and refused.json()["error"]["code"] == "invalid_api_key"
        assert client.get("/metrics", headers={"Authorization": "Bearer ef-secret"}).status_code == 200
        assert client.get("/healthz").status_code == 200
