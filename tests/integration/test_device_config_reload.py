"""A signed device config changing the context length, end to end in one process: the control
plane's real repositories sign it, the agent's real verifier (python-tuf) and updater apply it,
and the real SmolLM2 model is loaded again with the new context and serves it through the API."""

from __future__ import annotations

import urllib.parse
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy.engine import Engine
from sqlmodel import Session
from tuf.api import exceptions as tuf_errors
from tuf.ngclient import FetcherInterface

from edgefleet.agent.api import create_app
from edgefleet.agent.config import AgentConfig
from edgefleet.agent.runtimes.model_table import ModelTable
from edgefleet.agent.update.artifacts import ArtifactStore
from edgefleet.agent.update.state import load_state
from edgefleet.agent.update.updater import Updater
from edgefleet.agent.update.uptane_client import UptaneVerifier
from edgefleet.controlplane.build.bundles import BundleOnDisk
from edgefleet.controlplane.cli.client import extend_image_targets
from edgefleet.controlplane.store.engine import make_engine
from edgefleet.controlplane.trust.keys import KeyDir
from edgefleet.controlplane.trust.repositories import Repositories
from edgefleet.protos.fleet.v1 import common_pb2, device_pb2

pytestmark = pytest.mark.integration

DEVICE = "dev-c0nf16c0nf16"
CHUNK = 1 << 20


@dataclass
class Transport(FetcherInterface):
    """The device's metadata fetches, answered by the control plane's repositories in process."""

    engine: Engine
    repos: Repositories

    def _fetch(self, url: str) -> Iterator[bytes]:
        parsed = urllib.parse.urlsplit(url)
        with Session(self.engine) as session:
            data = self.repos.lookup(
                session, repo=parsed.netloc, device_id=DEVICE, name=parsed.path.lstrip("/")
            )
        if data is None:
            raise tuf_errors.DownloadHTTPError(f"{url} not found", 404)
        return iter([data])


class Artifacts:
    """DeviceService.FetchArtifact over the bundle's files."""

    def __init__(self, bundle: BundleOnDisk) -> None:
        self.paths = {
            info.sha256: bundle.artifact_path(name) for name, info in bundle.release.artifacts.items()
        }

    def FetchArtifact(self, request: Any, metadata: object = None) -> AsyncIterator[device_pb2.ArtifactChunk]:
        path = self.paths[request.sha256]

        async def chunks() -> AsyncIterator[device_pb2.ArtifactChunk]:
            with path.open("rb") as f:
                f.seek(request.offset)
                offset = request.offset
                while data := f.read(CHUNK):
                    yield device_pb2.ArtifactChunk(offset=offset, data=data)
                    offset += len(data)

        return chunks()


@dataclass
class Fleet:
    engine: Engine
    repos: Repositories
    keys: KeyDir
    tmp: Path

    def assign(self, generation: int, config: common_pb2.DeviceConfig | None = None) -> None:
        with Session(self.engine) as s, s.begin():
            self.repos.assign(
                s, device_id=DEVICE, generation=generation, releases=[("smollm2", 1)], config=config
            )


@pytest.fixture
def fleet(tmp_path: Path, keys: KeyDir, smollm2_bundle: BundleOnDisk) -> Fleet:
    engine = make_engine(f"sqlite:///{tmp_path / 'cp.db'}")
    repos = Repositories(keys)
    with Session(engine) as s, s.begin():
        repos.bootstrap(s)
        image = extend_image_targets(repos.image_targets(s), smollm2_bundle, keys.release_signers())
        repos.publish_image_targets(s, image, release=smollm2_bundle.release)
    return Fleet(engine, repos, keys, tmp_path)


def agent(fleet: Fleet) -> tuple[AgentConfig, Updater]:
    config = AgentConfig(
        controlplane="127.0.0.1:1",
        state_dir=fleet.tmp / "agent",
        trust_path=fleet.tmp / "trust.json",
        n_ctx=512,
    )
    config.state_dir.mkdir(exist_ok=True)
    updater = Updater(
        config=config,
        store=ArtifactStore(config.artifact_dir, config.download_dir, config.unpacked_dir),
        models=ModelTable(),
        state=load_state(config.state_path),
        on_transition=lambda state, generation, detail: None,
        available_ram=lambda: None,
    )
    return config, updater


async def max_model_len(client: httpx.AsyncClient) -> int:
    response = await client.get("/v1/models")
    assert response.status_code == 200, response.text
    (card,) = response.json()["data"]
    assert card["id"] == "smollm2"
    return int(card["max_model_len"])


async def long_prompt(client: httpx.AsyncClient) -> httpx.Response:
    """A prompt of about 700 tokens: over a 512-token context, within a 1024-token one."""
    return await client.post(
        "/v1/completions",
        json={"model": "smollm2", "prompt": "one two three four five six seven " * 100, "max_tokens": 1},
    )


async def test_a_new_context_length_reloads_the_model_and_serves_with_it(
    fleet: Fleet, smollm2_bundle: BundleOnDisk
) -> None:
    config, updater = agent(fleet)
    verifier = UptaneVerifier(
        tuf_dir=config.tuf_dir,
        anchors=fleet.keys.trust_anchors(),
        fetcher=Transport(fleet.engine, fleet.repos),
        device_id=DEVICE,
    )
    stub = Artifacts(smollm2_bundle)
    app = create_app(models=updater.models, observer=lambda stats: None)
    await updater.restore()
    try:
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://agent"
        ) as client:
            fleet.assign(1)
            await updater.apply(device_pb2.DesiredState(generation=1), verifier, stub)  # type: ignore[arg-type]
            assert updater.state.applied_generation == 1, updater.state.last_error
            assert await max_model_len(client) == 512  # the command line's
            too_long = await long_prompt(client)
            assert too_long.status_code == 400 and "context" in too_long.text

            fleet.assign(2, common_pb2.DeviceConfig(n_ctx=1024, n_threads=1))
            await updater.apply(device_pb2.DesiredState(generation=2), verifier, stub)  # type: ignore[arg-type]
            state = updater.state
            assert (state.phase, state.applied_generation) == (common_pb2.DEVICE_STATE_ACTIVE, 2), (
                state.last_error
            )
            assert state.config_in_force() == common_pb2.DeviceConfig(n_ctx=1024, n_threads=1)
            assert await max_model_len(client) == 1024
            described = updater.models.get("smollm2")
            assert described is not None and described.describe().n_threads == 1
            served = await long_prompt(client)
            assert served.status_code == 200, served.text
            assert served.json()["usage"]["prompt_tokens"] > 512
    finally:
        for name in updater.models.names():
            runtime = updater.models.remove(name)
            if runtime is not None:
                runtime.unload()

    # A restart loads the model with the config in force, offline.
    _, rebooted = agent(fleet)
    await rebooted.restore()
    runtime = rebooted.models.get("smollm2")
    assert runtime is not None
    try:
        assert runtime.describe().n_ctx == 1024
    finally:
        runtime.unload()
