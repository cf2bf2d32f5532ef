"""A device serves its installed, verified model whatever else is broken, stops crash loops, and
stops promptly when asked.

Black box: a real control plane, Mosquitto and agent processes with the real SmolLM2 GGUF;
damage is done to the agent's files between runs, crashes are SIGKILLs aimed by what the agent
itself persisted (its "loading" marker in state.json), no hooks in product code.
"""

from __future__ import annotations

import json
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from edgefleet.controlplane.build.bundles import BundleOnDisk
from edgefleet.controlplane.trust.keys import KeyDir
from edgefleet.protos.fleet.v1 import common_pb2
from tests.conftest import free_port
from tests.e2e.fleet_harness import Fleet, client_for, wait_for
from tests.e2e.test_crash_recovery import padded_release

pytestmark = pytest.mark.e2e

BUNDLE = "smollm2"
STOP_BOUND_SECONDS = 15.0  # generous: the agent's own deadline is 10 s


class Device:
    """One control plane, one agent; helpers over its state dir and API."""

    def __init__(self, fleet: Fleet) -> None:
        self.fleet = fleet
        self.generation = 0

    @property
    def state_dir(self) -> Path:
        return self.fleet.agent_dir(0)

    @property
    def url(self) -> str:
        return self.fleet.agent_url(0)

    def state(self) -> dict[str, Any]:
        try:
            data: dict[str, Any] = json.loads((self.state_dir / "state.json").read_bytes())
        except (OSError, ValueError):
            return {}  # between an atomic rename's two names, or being rebuilt
        return data

    def restart(self) -> float:
        """Starts the agent again; returns the monotonic time it was started at."""
        started = time.monotonic()
        self.fleet.agents[0] = self.fleet.start_agent(0, token=None)
        return started

    def kill(self) -> None:
        self.fleet.agents[0].kill()

    def deploy(self, version: int) -> int:
        self.generation = self.fleet.deploy(BUNDLE, version)
        return self.generation

    def serving(self) -> bool:
        try:
            ids = [m.id for m in client_for(self.url, timeout=10).models.list().data]
        except openai.APIConnectionError:
            return False
        return ids == [BUNDLE]

    def wait_serving(self, timeout: float = 120) -> None:
        wait_for("the agent to serve the model", self.serving, timeout=timeout, interval=0.05)

    def chat(self) -> str:
        chat = client_for(self.url, timeout=60).chat.completions.create(
            model=BUNDLE, messages=[{"role": "user", "content": "Hi"}], max_tokens=4, temperature=0
        )
        assert chat.usage is not None and chat.usage.completion_tokens > 0
        return chat.choices[0].message.content or ""

    def health(self) -> dict[str, Any]:
        body: dict[str, Any] = httpx.get(f"{self.url}/healthz", timeout=30).json()
        return body

    def device(self) -> common_pb2.DeviceSummary:
        (device,) = self.fleet.devices()
        return device

    def wait_converged(self, version: int, timeout: float = 120) -> None:
        def converged() -> bool:
            device = self.device()
            return (
                device.state == common_pb2.DEVICE_STATE_ACTIVE
                and device.applied_generation == self.generation
                and (device.active_bundle.name, device.active_bundle.version) == (BUNDLE, version)
            )

        wait_for(f"the control plane to list {BUNDLE}@{version} active", converged, timeout, 0.1)

    def kill_when_loading(self, *, crashes: int) -> dict[str, Any]:
        """SIGKILLs the agent the moment state.json says it is loading the deployed generation
        (with ``crashes`` deaths of that load counted already); returns the marker."""

        def marker() -> dict[str, Any] | None:
            loading = self.state().get("loading")
            if loading and loading["generation"] == self.generation and loading["crashes"] == crashes:
                return dict(loading)
            return None

        found = wait_for("the loading marker", marker, timeout=120, interval=0.002)
        self.kill()
        return found


@pytest.fixture(scope="module")
def device(
    tmp_path_factory: pytest.TempPathFactory,
    keys: KeyDir,
    mosquitto: str,
    smollm2_bundle: BundleOnDisk,
    smollm2_path: Path,
) -> Iterator[Device]:
    work = tmp_path_factory.mktemp("recovery")
    fleet = Fleet(
        target=f"127.0.0.1:{free_port()}",
        data_dir=work / "cp",
        work=work,
        keys=keys,
        mqtt=mosquitto,
        agent_ports=[free_port()],
    )
    device = Device(fleet)
    fleet.start_controlplane()
    try:
        for bundle in (
            smollm2_bundle,
            padded_release(smollm2_path, keys=keys, version=2, pad=4096, work=work),
        ):
            fleet.push_bundle(bundle.path)
        token = fleet.fleetctl("token", "create").strip()
        fleet.agents = [fleet.start_agent(0, token)]
        wait_for("the device to enroll", lambda: len(fleet.devices()) == 1, timeout=60)
        device.deploy(1)
        device.wait_converged(1)
        yield device
    finally:
        fleet.stop_all()
        fleet.print_logs()


def test_a_corrupt_outbox_and_a_truncated_state_file_do_not_stop_serving(device: Device) -> None:
    """Both damaged at once: the agent starts, serves the verified model again, sets the
    outbox aside and rebuilds the state from the trusted metadata and the artifacts on disk."""
    device.wait_serving()
    device.kill()
    state_file = device.state_dir / "state.json"
    whole = state_file.read_bytes()
    state_file.write_bytes(whole[: len(whole) // 2])  # a write the disk cut short
    outbox = device.state_dir / "outbox.sqlite"
    outbox.write_bytes(b"\x00garbage, not SQLite\x00" * 512)
    for side in ("outbox.sqlite-wal", "outbox.sqlite-shm"):
        (device.state_dir / side).unlink(missing_ok=True)

    started = device.restart()
    device.wait_serving()
    restart_to_serving = time.monotonic() - started
    print(f"restart to serving over a corrupt outbox and a truncated state file: {restart_to_serving:.2f} s")
    assert device.chat()

    aside = sorted(device.state_dir.glob("outbox.sqlite.corrupt-*"))
    assert aside, "the corrupt outbox was not kept for inspection"
    health = device.health()
    assert health["active"] == f"{BUNDLE}@1", health
    assert health["recovery"] and "rebuilt: serving smollm2@1" in health["recovery"][0], health
    assert health["telemetry"]["outbox_resets"] == 1, health
    assert (device.state_dir / "state.json.damaged").read_bytes() == whole[: len(whole) // 2]
    # The nudge applies the current generation again, finding the model serving.
    device.wait_converged(1)
    rebuilt = wait_for(
        "the rebuilt state to record the generation",
        lambda: (s := device.state()).get("applied_generation") == device.generation and s,
        timeout=60,
    )
    (record,) = rebuilt["models"]
    assert (record["bundle"], record["version"], record["generation"]) == (BUNDLE, 1, device.generation)


def test_a_release_the_agent_dies_loading_twice_is_refused_and_reported(device: Device) -> None:
    """Killed inside the new release's load twice (as a segfault or the OOM killer would):
    the third process serves the old model, refuses the release without loading it, and the
    control plane hears a load failure for that generation."""
    device.wait_serving()
    generation = device.deploy(2)
    first = device.kill_when_loading(crashes=0)
    assert (first["bundle"], first["version"]) == (BUNDLE, 2)

    device.restart()
    device.wait_serving()  # the old release serves while the new one is tried again
    device.kill_when_loading(crashes=1)

    device.restart()
    device.wait_serving()

    def refused() -> common_pb2.DeviceSummary | None:
        summary = device.device()
        return summary if summary.state == common_pb2.DEVICE_STATE_FAILED else None

    summary = wait_for("the control plane to hear the load failure", refused, timeout=120)
    assert "crashed while loading smollm2@2" in summary.last_error, summary
    state = device.state()
    assert state["loading"] is None, state
    assert [(c["bundle"], c["version"], c["generation"], c["crashes"]) for c in state["crashed"]] == [
        (BUNDLE, 2, generation, 2)
    ]
    assert state["phase"] == common_pb2.DEVICE_STATE_FAILED
    assert state["last_error_kind"] == "RuntimeCrashedWhileLoading"
    assert device.health()["active"] == f"{BUNDLE}@1"
    assert device.chat()

    # Not retried in this generation: another restart refuses it again without loading it.
    device.kill()
    device.restart()
    device.wait_serving()
    wait_for("the refusal again", lambda: device.state().get("phase") == common_pb2.DEVICE_STATE_FAILED, 120)
    assert device.state()["loading"] is None

    # A newer generation is a new chance: uninterrupted, it installs.
    device.deploy(2)
    device.wait_converged(2)


def test_sigterm_stops_the_agent_promptly_with_a_long_request_in_flight(device: Device) -> None:
    """A stream of many tokens is in flight when SIGTERM arrives: the process exits within the
    bound, whatever the request is doing."""
    device.wait_serving()
    first_token = threading.Event()
    ended: list[BaseException | None] = []

    def long_request() -> None:
        try:
            with httpx.stream(
                "POST",
                f"{device.url}/v1/completions",
                json={
                    "model": BUNDLE,
                    "prompt": "1, 2, 3, 4, 5, 6, 7, 8, 9, 10,",
                    "max_tokens": 1800,
                    "temperature": 0,
                    "stream": True,
                },
                timeout=120,
            ) as response:
                for _ in response.iter_lines():
                    first_token.set()
            ended.append(None)
        except httpx.HTTPError as exc:
            ended.append(exc)
        finally:
            first_token.set()

    client = threading.Thread(target=long_request, daemon=True)
    client.start()
    assert first_token.wait(120), "the stream never started"
    agent = device.fleet.agents[0]
    assert agent.alive, "the request finished before the signal could interrupt it"
    sent = time.monotonic()
    agent.popen.send_signal(signal.SIGTERM)
    try:
        agent.popen.wait(timeout=STOP_BOUND_SECONDS)
    except subprocess.TimeoutExpired:
        agent.kill()
        pytest.fail(f"the agent did not exit within {STOP_BOUND_SECONDS:.0f} s of SIGTERM")
    print(f"agent exited {time.monotonic() - sent:.2f} s after SIGTERM with a request in flight")
    client.join(timeout=30)
    device.restart()
    device.wait_serving()
