"""The device API requires a bearer key on /v1/* when it is reachable beyond loopback."""

from __future__ import annotations

from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from edgefleet.agent.api.app import create_app
from edgefleet.agent.api.auth import is_loopback, load_or_create_api_key, require_api_key
from edgefleet.agent.runtimes.model_table import ModelTable


@pytest.fixture
def client() -> TestClient:
    app = create_app(models=ModelTable(), observer=lambda stats: None)
    require_api_key(app, "ef-secret")
    return TestClient(app)


def test_requests_without_the_key_get_an_openai_401(client: TestClient) -> None:
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "ef-secret"}):
        response = client.get("/v1/models", headers=headers)
        assert response.status_code == 401
        assert response.json()["error"]["code"] == "invalid_api_key"


def test_the_key_opens_the_api_and_health_stays_open(client: TestClient) -> None:
    assert client.get("/v1/models", headers={"Authorization": "Bearer ef-secret"}).status_code == 200
    assert client.get("/healthz").status_code in (200, 503)  # no model loaded here: 503, but not 401


def test_loopback_detection() -> None:
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.0.2.1") and not is_loopback("device.local")


def test_key_file_is_created_once_and_private(tmp_path: Path) -> None:
    first = load_or_create_api_key(tmp_path / "api.key")
    assert first.startswith("ef-") and len(first) > 40
    assert load_or_create_api_key(tmp_path / "api.key") == first
    assert (tmp_path / "api.key").stat().st_mode & 0o077 == 0
