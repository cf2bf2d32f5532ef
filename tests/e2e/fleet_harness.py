"""Process management shared by the end-to-end suites: a control plane and agents as real
processes, fleetctl as a real command, and polling with deadlines instead of sleeps."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import grpc
import openai

from edgefleet.controlplane.cli.client import TOKEN_ENV, operator_stub
from edgefleet.controlplane.cli.demo import serve_command
from edgefleet.controlplane.fleet.rbac import ADMIN_TOKEN_FILE
from edgefleet.controlplane.trust.keys import KeyDir
from edgefleet.controlplane.trust.tls import CA_ENV
from edgefleet.protos.fleet.v1 import common_pb2, operator_pb2, operator_pb2_grpc
from tests.conftest import free_port, port_open

T = TypeVar("T")
REPO = Path(__file__).resolve().parents[2]


def wait_for(what: str, probe: Callable[[], T | None], timeout: float = 120, interval: float = 0.2) -> T:
    """Polls ``probe`` until it returns something truthy; fails the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = probe()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


@dataclass
class Proc:
    """A child process whose output goes to a log file."""

    popen: subprocess.Popen[bytes]
    log: Path

    @property
    def alive(self) -> bool:
        return self.popen.poll() is None

    def stop(self, sig: int = signal.SIGTERM) -> None:
        """Asks the process to stop; kills it if it has not after 20 s."""
        if self.popen.poll() is None:
            self.popen.send_signal(sig)
            try:
                self.popen.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()

    def kill(self) -> None:
        """SIGKILL: no handler, no cleanup, no flush — a crash or power cut as the process sees it."""
        if self.popen.poll() is None:
            self.popen.kill()
        self.popen.wait(timeout=20)


def spawn(args: list[str], log: Path, env: dict[str, str] | None = None) -> Proc:
    """Runs ``python -m ARGS`` from the repository with ``env`` added to ours, appending its
    output to ``log``."""
    with log.open("ab") as out:
        popen = subprocess.Popen(
            [sys.executable, "-m", *args],
            cwd=REPO,
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
        )
    return Proc(popen, log)


def fleetctl(*args: str, token: str, ca: Path, timeout: float = 120) -> str:
    """Runs the operator CLI, as the operator ``token`` names, verifying the control plane
    against the fleet CA ``ca``; returns its stdout and fails the test on a non-zero exit."""
    done = subprocess.run(
        [sys.executable, "-m", "edgefleet.controlplane.cli", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, TOKEN_ENV: token, CA_ENV: str(ca)},
    )
    assert done.returncode == 0, f"fleetctl {args} failed: {done.stderr}"
    return done.stdout


def client_for(url: str, timeout: float = 120) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=timeout)


@dataclass
class Fleet:
    """One control plane and any number of agents, each agent with its own state dir and port."""

    target: str
    data_dir: Path
    work: Path
    keys: KeyDir
    mqtt: str
    agent_ports: list[int]
    device_port: int = field(default_factory=free_port)  # kept across restarts: agents remember it
    serve_options: list[str] = field(default_factory=list)
    agent_options: list[str] = field(default_factory=list)  # added to every agent's command line
    agents: list[Proc] = field(default_factory=list)
    controlplane: Proc = field(init=False)

    @property
    def operator_token(self) -> str:
        """The admin token the control plane wrote into its data dir at first start."""
        return (self.data_dir / ADMIN_TOKEN_FILE).read_text().strip()

    def fleetctl(self, *args: str) -> str:
        """``fleetctl ARGS --controlplane TARGET`` as the control plane's admin."""
        return fleetctl(
            *args, "--controlplane", self.target, token=self.operator_token, ca=self.keys.tls_ca_path
        )

    def operator_stub(self) -> tuple[grpc.Channel, operator_pb2_grpc.OperatorServiceStub]:
        return operator_stub(self.target, self.operator_token, ca_pem=self.keys.tls_ca_path.read_bytes())

    def stub(self) -> operator_pb2_grpc.OperatorServiceStub:
        return self.operator_stub()[1]

    def devices(self) -> list[common_pb2.DeviceSummary]:
        channel, stub = self.operator_stub()
        with channel:
            return list(stub.ListDevices(operator_pb2.ListDevicesRequest(), timeout=10).devices)

    def push_bundle(self, bundle_dir: Path) -> str:
        """``fleetctl bundle push``: signs the image repository's new targets with the release keys."""
        return self.fleetctl("bundle", "push", str(bundle_dir), "--keys-dir", str(self.keys.path)).strip()

    def deploy(self, name: str, version: int) -> int:
        """Points every device at ``name@version`` through the operator API; returns the new generation.

        The RPC itself, not fleetctl, so that time measured from its return is time the agent had.
        """
        channel, stub = self.operator_stub()
        with channel:
            response = stub.Deploy(
                operator_pb2.DeployRequest(
                    bundle=common_pb2.BundleRef(name=name, version=version), all_devices=True
                ),
                timeout=10,
            )
        return int(response.max_generation)

    def agent_dir(self, i: int) -> Path:
        return self.work / f"agent-{i}"

    def agent_log(self, i: int) -> Path:
        return self.work / f"agent-{i}.log"

    def agent_url(self, i: int) -> str:
        return f"http://127.0.0.1:{self.agent_ports[i]}"

    def start_controlplane(self) -> None:
        port = int(self.target.rsplit(":", 1)[1])
        command = serve_command(
            target=self.target,
            device_target=f"127.0.0.1:{self.device_port}",
            data_dir=self.data_dir,
            keys_dir=self.keys.path,
            extra=["--mqtt", self.mqtt, *self.serve_options],
        )
        self.controlplane = spawn(command[2:], self.work / "controlplane.log")
        wait_for("control plane port", lambda: port_open("127.0.0.1", port), timeout=60, interval=0.05)
        assert (self.data_dir / ADMIN_TOKEN_FILE).is_file(), "the control plane wrote no admin token"

    def start_agent(self, i: int, token: str | None) -> Proc:
        """Starts agent ``i``; without a token it relies on the identity it persisted."""
        args = [
            "edgefleet.agent.cli",
            "run",
            "--controlplane",
            self.target,
            "--trust",
            str(self.keys.trust_path),
            "--state-dir",
            str(self.agent_dir(i)),
            "--listen",
            f"127.0.0.1:{self.agent_ports[i]}",
            "--heartbeat-seconds",
            "1",
            "--telemetry-interval",
            "1",
            "--threads",
            "1",
        ]
        if token:
            args += ["--token", token]
        return spawn([*args, *self.agent_options], self.agent_log(i))

    def stop_all(self) -> None:
        for agent in self.agents:
            agent.stop()
        if hasattr(self, "controlplane"):
            self.controlplane.stop()

    def print_logs(self, tail_chars: int = 3000) -> None:
        for log in sorted(self.work.glob("*.log")):
            print(f"--- {log.name}\n{log.read_text(errors='replace')[-tail_chars:]}")
