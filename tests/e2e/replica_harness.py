"""Several control-plane replicas as real ``fleetctl serve`` processes on one PostgreSQL and one
Mosquitto (the production config, TLS with the fleet CA and a ``crlfile``), real agents pinned
to chosen replicas, and the probes the replica end-to-end test measures with: a desired-state
stream held as a device, a broker connection made with a device's certificate, the broker
host's CRL timer, and which replica ports an agent process is connected to.

Every replica is configured through the ``EDGEFLEET_*`` environment, as containers and the
Kubernetes manifests configure them, and shares the one key directory. Waiting is polling
with deadlines (``fleet_harness.wait_for``), never a fixed sleep.
"""

from __future__ import annotations

import os
import queue
import re
import shlex
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import psutil

from edgefleet.agent.device.identity import load_identity
from edgefleet.agent.device.tls import DeviceCertificate, broker_tls_context, load_certificate
from edgefleet.controlplane.cli.client import operator_stub
from edgefleet.controlplane.cli.demo import health_serving
from edgefleet.controlplane.fleet.rbac import ADMIN_TOKEN_FILE
from edgefleet.controlplane.trust.keys import KeyDir
from edgefleet.protos.fleet.v1 import device_pb2, device_pb2_grpc, operator_pb2_grpc
from tests.conftest import free_port
from tests.e2e.fleet_harness import REPO, Proc, fleetctl, spawn, wait_for
from tests.mqtt_tls import Probe, TlsBroker

DEPLOY_SYSTEMD = REPO / "deploy" / "systemd"
CRL_UNIT = DEPLOY_SYSTEMD / "edgefleet-crl.service"
CRL_TIMER = DEPLOY_SYSTEMD / "edgefleet-crl.timer"
INSTALLED_CRL = "devices.crl.pem"  # the file name the unit installs, beside Mosquitto's config
DESIRED_STATE_LINE = "desired state: generation"  # what the agent logs for each message it receives


@dataclass
class Replica:
    """One ``fleetctl serve`` process: its own data dir, gRPC, device and metrics ports."""

    name: str
    work: Path
    public_port: int = field(default_factory=free_port)
    device_port: int = field(default_factory=free_port)
    metrics_port: int = field(default_factory=free_port)
    device_advertise: str | None = None
    proc: Proc | None = None

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.public_port}"

    @property
    def device_target(self) -> str:
        return f"127.0.0.1:{self.device_port}"

    @property
    def data_dir(self) -> Path:
        return self.work / f"replica-{self.name}"

    @property
    def log(self) -> Path:
        return self.work / f"replica-{self.name}.log"

    @property
    def crl_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/crl.pem"

    def environment(self, *, db_url: str, keys: KeyDir, broker: TlsBroker) -> dict[str, str]:
        env = {
            "EDGEFLEET_DB": db_url,
            "EDGEFLEET_KEYS_DIR": str(keys.path),
            "EDGEFLEET_DATA_DIR": str(self.data_dir),
            "EDGEFLEET_LISTEN": self.target,
            "EDGEFLEET_DEVICE_LISTEN": self.device_target,
            "EDGEFLEET_METRICS_LISTEN": f"127.0.0.1:{self.metrics_port}",
            "EDGEFLEET_REPLICA_ID": self.name,
            "EDGEFLEET_MQTT": broker.controlplane_url,
            "EDGEFLEET_MQTT_ADVERTISE": broker.device_url,
        }
        if self.device_advertise is not None:
            env["EDGEFLEET_DEVICE_ADVERTISE"] = self.device_advertise
        return env

    def launch(self, *, db_url: str, keys: KeyDir, broker: TlsBroker) -> None:
        """Starts the process without waiting for it (see ``wait_serving``)."""
        env = self.environment(db_url=db_url, keys=keys, broker=broker)
        self.proc = spawn(["edgefleet.controlplane.cli", "serve"], self.log, env)

    def wait_serving(self, ca_pem: bytes) -> None:
        """Returns once the replica's health service answers SERVING (it reflects the database)."""

        def serving() -> bool | None:
            assert self.proc is not None and self.proc.alive, f"replica {self.name} exited"
            return health_serving(self.target, ca_pem)

        wait_for(f"replica {self.name} to serve", serving, timeout=90, interval=0.2)

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop()

    def log_lines(self, pattern: str) -> list[str]:
        return [line for line in self.log.read_text(errors="replace").splitlines() if pattern in line]


@dataclass
class Agent:
    """One ``fleet-agent run`` process with its own state dir and API port."""

    index: int
    controlplane: str  # what --controlplane says: one replica, or a list
    home: str  # the replica its desired-state stream was opened on (or it enrolled through)
    work: Path
    desired_via: str = "broker"  # --desired-via: notices on the broker, or a stream
    api_port: int = field(default_factory=free_port)
    proc: Proc | None = None

    @property
    def state_dir(self) -> Path:
        return self.work / f"agent-{self.index}"

    @property
    def log(self) -> Path:
        return self.work / f"agent-{self.index}.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    def start(self, keys: KeyDir, token: str) -> None:
        args = [
            "edgefleet.agent.cli", "run",
            "--controlplane", self.controlplane,
            "--trust", str(keys.trust_path),
            "--state-dir", str(self.state_dir),
            "--listen", f"127.0.0.1:{self.api_port}",
            "--token", token,
            "--heartbeat-seconds", "1",
            "--telemetry-interval", "1",
            "--threads", "1",
            "--desired-via", self.desired_via,
        ]  # fmt: skip
        self.proc = spawn(args, self.log, {})

    def enrolled_id(self) -> str | None:
        identity = load_identity(self.state_dir / "identity.json")
        return identity.device_id if identity else None

    @property
    def device_id(self) -> str:
        device_id = self.enrolled_id()
        assert device_id is not None, f"agent {self.index} has not enrolled"
        return device_id

    def certificate(self) -> DeviceCertificate:
        certificate = load_certificate(self.state_dir / "device.pem")
        assert certificate is not None, f"agent {self.index} holds no certificate"
        return certificate

    def connected_ports(self) -> set[int]:
        """The remote ports of the agent process's established TCP connections: which replica
        (device or public port) and which broker it talks to right now, seen from outside."""
        assert self.proc is not None
        if not self.proc.alive:
            return set()
        return {
            conn.raddr.port
            for conn in psutil.Process(self.proc.popen.pid).net_connections(kind="tcp")
            if conn.status == psutil.CONN_ESTABLISHED and conn.raddr
        }

    def desired_state_lines(self) -> int:
        """How many desired-state messages the agent logged: a new one after a replica died
        means its stream reopened elsewhere (every new stream starts with the current state)."""
        return self.log.read_text(errors="replace").count(DESIRED_STATE_LINE)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop()


@dataclass
class ReplicaFleet:
    """Replicas and agents on one database, one broker and one key directory."""

    work: Path
    keys: KeyDir
    db_url: str
    broker: TlsBroker
    replicas: dict[str, Replica]
    agents: list[Agent] = field(default_factory=list)
    crl_timer: CrlTimer | None = None  # the broker host's, once started
    figures: dict[str, object] = field(default_factory=dict)

    @property
    def ca_pem(self) -> bytes:
        return self.keys.tls_ca_path.read_bytes()

    @property
    def operator_token(self) -> str:
        """The admin token whichever replica started first on the empty database wrote."""
        for replica in self.replicas.values():
            path = replica.data_dir / ADMIN_TOKEN_FILE
            if path.is_file():
                return path.read_text().strip()
        raise AssertionError("no replica wrote an admin token")

    def start_replicas(self, *names: str) -> None:
        """Starts the replicas side by side; returns once every one serves."""
        for name in names:
            self.replicas[name].launch(db_url=self.db_url, keys=self.keys, broker=self.broker)
        for name in names:
            self.replicas[name].wait_serving(self.ca_pem)

    def fleetctl(self, *args: str, via: str) -> str:
        """``fleetctl ARGS`` as the admin, through replica ``via``."""
        target = self.replicas[via].target
        return fleetctl(*args, "--controlplane", target, token=self.operator_token, ca=self.keys.tls_ca_path)

    @contextmanager
    def operator(self, via: str) -> Iterator[operator_pb2_grpc.OperatorServiceStub]:
        channel, stub = operator_stub(self.replicas[via].target, self.operator_token, ca_pem=self.ca_pem)
        with channel:
            yield stub

    def start_agent(self, controlplane: str, token: str, *, home: str, desired_via: str = "broker") -> Agent:
        agent = Agent(len(self.agents), controlplane, home, self.work, desired_via=desired_via)
        self.agents.append(agent)
        agent.start(self.keys, token)
        return agent

    def on(self, home: str) -> list[Agent]:
        """The agents whose stream was opened on replica ``home`` and that still run."""
        return [a for a in self.agents if a.home == home and a.proc is not None and a.proc.alive]

    def stop_all(self) -> None:
        for agent in self.agents:
            agent.stop()
        for replica in self.replicas.values():
            replica.stop()

    def print_logs(self, tail_chars: int = 4000) -> None:
        for log in sorted(self.work.glob("*.log")):
            print(f"--- {log.name}\n{log.read_text(errors='replace')[-tail_chars:]}")


# -- probes ------------------------------------------------------------------------------------


class HeldStream:
    """A WatchDesiredState stream opened on one replica's device port with a device's
    certificate, read by a thread that stamps (monotonic clock) when and how it ends."""

    def __init__(self, target: str, ca_pem: bytes, certificate: DeviceCertificate) -> None:
        self.channel = grpc.secure_channel(target, certificate.grpc_credentials(ca_pem))
        self.call = device_pb2_grpc.DeviceServiceStub(self.channel).WatchDesiredState(
            device_pb2.WatchDesiredStateRequest()
        )
        self.messages: queue.Queue[device_pb2.DesiredState] = queue.Queue()
        self.ended = threading.Event()
        self.ended_at: float | None = None
        self.code: grpc.StatusCode | None = None
        self._reader = threading.Thread(target=self._read, name="held-stream", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        try:
            for message in self.call:
                self.messages.put(message)
        except grpc.RpcError as exc:
            self.code = exc.code() if isinstance(exc, grpc.Call) else None
        self.ended_at = time.monotonic()
        self.ended.set()

    def first(self, timeout: float) -> device_pb2.DesiredState:
        """The state the replica sends as the stream opens: proof that it registered it."""
        return self.messages.get(timeout=timeout)

    def close(self) -> None:
        self.call.cancel()
        self.channel.close()


def broker_admits(broker: TlsBroker, ca_pem: bytes, certificate: DeviceCertificate) -> bool:
    """One MQTT v5 connection to the broker's device listener with ``certificate``, made with
    the agent's own TLS context; True when the broker accepted it. Closed at once."""
    probe = Probe("revoked-probe")
    try:
        return probe.connect(broker.tls_port, tls=broker_tls_context(ca_pem, certificate))
    finally:
        probe.close()


def unit_commands(unit: Path, key: str, etc: Path) -> list[list[str]]:
    """The unit's ``key=`` command lines as systemd runs them: continuation lines joined, ``$$``
    unescaped, with Mosquitto's directory moved to ``etc``."""
    joined = unit.read_text().replace("\\\n", " ")
    values = [line.split("=", 1)[1] for line in joined.splitlines() if line.startswith(f"{key}=")]
    return [shlex.split(v.replace("$$", "$").replace("/etc/mosquitto/edgefleet", str(etc))) for v in values]


def timer_interval(timer: Path = CRL_TIMER) -> float:
    """The timer's ``OnUnitActiveSec`` in seconds: how often the broker host pulls the CRL."""
    found = re.search(r"^OnUnitActiveSec=(\d+)s$", timer.read_text(), re.MULTILINE)
    assert found, f"{timer} sets no OnUnitActiveSec in seconds"
    return float(found.group(1))


class CrlTimer:
    """The broker host's edgefleet-crl.timer: every ``interval`` seconds the commands of
    edgefleet-crl.service as systemd runs them (ExecCondition, then the install), in pull mode
    from ``crl_url``, with Mosquitto's directory moved to the broker's work dir and the
    ``systemctl try-reload-or-restart mosquitto`` replaced by the same SIGHUP.

    Mosquitto reads its ``crlfile`` (the TLS broker's ``devices.crl``); that name becomes a
    link to the unit's install target, so every install is what the broker reloads, exactly as
    the unit and deploy/mosquitto/mosquitto.conf pair them."""

    def __init__(self, broker: TlsBroker, crl_url: str, interval: float) -> None:
        self.broker = broker
        self.interval = interval
        self.env = {**os.environ, "EDGEFLEET_CRL_URL": crl_url}
        [self.condition] = unit_commands(CRL_UNIT, "ExecCondition", broker.work)
        self.install = unit_commands(CRL_UNIT, "ExecStart", broker.work)[0]
        self.installs: list[float] = []  # when (monotonic) Mosquitto was told to reload a new CRL
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="crl-timer", daemon=True)

    def start(self) -> None:
        """The link (read at the next reload only), the first run by hand (as the unit's comment
        asks before Mosquitto starts), then the timer. One reload: Mosquitto drops a SIGHUP that
        arrives while it is still handling the one before."""
        link = self.broker.work / "devices.crl.link"
        link.symlink_to(INSTALLED_CRL)
        link.replace(self.broker.crl_path)
        assert self.run_once(), f"the first CRL pull failed: {self.failures}"
        self._thread.start()

    def run_once(self) -> bool:
        """One activation of the unit: True when it installed a CRL and reloaded Mosquitto."""
        condition = subprocess.run(self.condition, env=self.env, check=False, timeout=60, capture_output=True)
        if condition.returncode == 1:
            return False  # same serials: skipped, as systemd skips on a failed condition
        if condition.returncode != 0:
            self.failures.append(condition.stderr.decode(errors="replace"))
            return False
        install = subprocess.run(self.install, env=self.env, check=False, timeout=60, capture_output=True)
        if install.returncode != 0:
            self.failures.append(install.stderr.decode(errors="replace"))
            return False
        self.installs.append(time.monotonic())  # before the SIGHUP: no refusal can precede it
        try:
            self.broker.reload()
        except TimeoutError as exc:
            self.failures.append(str(exc))
            return False
        return True

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.run_once()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=60)
