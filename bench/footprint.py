"""What the agent costs in memory beyond the model runtime it wraps.

    python -m bench.footprint [--quick]

Baseline: a bare Python process that loads the same GGUF with llama-cpp-python (same n_ctx
and threads) and runs one short generation. Measured: a real agent process that enrolled
with a real control plane (embedded broker, SQLite), installed the signed bundle, passed its
smoke test and then sat idle with its API, gRPC stream, MQTT publisher and outbox open.
Both figures are resident set size after settling; ``ratio`` is agent / baseline.
Progress goes to stderr; the last stdout line is JSON.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc

from edgefleet.controlplane.build.bundles import build_bundle
from edgefleet.controlplane.cli.child_process import Processes
from edgefleet.controlplane.cli.client import all_pages, operator_stub, publish_bundle
from edgefleet.controlplane.cli.demo import (
    agent_command,
    find_model,
    free_port,
    health_serving,
    serve_command,
    wait_for,
)
from edgefleet.controlplane.fleet.rbac import ADMIN_TOKEN_FILE
from edgefleet.controlplane.trust.keys import init_keys
from edgefleet.protos.fleet.v1 import common_pb2, operator_pb2

N_CTX = 2048
THREADS = 1
TARGET = 1.5
BASELINE_SCRIPT = """
import sys, time
from llama_cpp import Llama
llm = Llama(model_path=sys.argv[1], n_ctx=int(sys.argv[2]), n_threads=int(sys.argv[3]), verbose=False)
llm.create_completion("Hello", max_tokens=4, temperature=0)
print("ready", flush=True)
time.sleep(3600)
"""


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for {pid}")


def baseline_rss(model: Path, settle: float) -> int:
    proc = subprocess.Popen(
        [sys.executable, "-c", BASELINE_SCRIPT, str(model), str(N_CTX), str(THREADS)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        if proc.stdout.readline().strip() != "ready":
            raise RuntimeError("baseline process failed to load the model")
        time.sleep(settle)
        return rss_bytes(proc.pid)
    finally:
        proc.kill()
        proc.wait()


def agent_rss(model: Path, work: Path, settle: float) -> int:
    procs = Processes()
    try:
        keys = init_keys(work / "keys")
        ca_pem = keys.tls_ca_path.read_bytes()
        target = f"127.0.0.1:{free_port()}"
        procs.start(
            "control plane",
            serve_command(
                target=target,
                device_target=f"127.0.0.1:{free_port()}",
                data_dir=work / "cp",
                keys_dir=keys.path,
            ),
            work / "controlplane.log",
        )
        wait_for("control plane", lambda: health_serving(target, ca_pem), timeout=60)
        bundle = build_bundle(
            model, name="smollm2", version=1, out=work / "bundle", signers=keys.release_signers()
        )
        admin = (work / "cp" / ADMIN_TOKEN_FILE).read_text().strip()
        channel, stub = operator_stub(target, admin, ca_pem=ca_pem)
        with channel:
            pushed = publish_bundle(stub, bundle.path, keys.release_signers())
            token = stub.CreateToken(operator_pb2.CreateTokenRequest()).token
            agent = procs.start(
                "agent",
                agent_command(
                    target=target,
                    token=token,
                    trust=keys.trust_path,
                    state_dir=work / "agent",
                    port=free_port(),
                    extra=["--threads", str(THREADS), "--n-ctx", str(N_CTX)],
                ),
                work / "agent.log",
            )

            def devices() -> list[common_pb2.DeviceSummary] | None:
                try:
                    # Every page: one reply holds at most a page (500 devices by default).
                    found = list(all_pages(stub.ListDevices, operator_pb2.ListDevicesRequest(), "devices"))
                except grpc.RpcError:
                    return None
                return found or None

            wait_for("enrollment", devices, timeout=60)
            stub.Deploy(operator_pb2.DeployRequest(bundle=pushed.bundle, all_devices=True))
            wait_for(
                "the agent to serve",
                lambda: all(d.state == common_pb2.DEVICE_STATE_ACTIVE for d in devices() or []) or None,
                timeout=120,
            )
        time.sleep(settle)
        return rss_bytes(agent.pid)
    finally:
        procs.stop()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.footprint", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="settle 2 s instead of 10 s")
    args = parser.parse_args(argv)
    settle = 2.0 if args.quick else 10.0
    model = find_model()
    log("baseline: bare llama-cpp-python process")
    base = baseline_rss(model, settle)
    log(f"  {base / 2**20:.1f} MiB")
    log("agent: enrolled, installed, idle")
    with tempfile.TemporaryDirectory(prefix="edgefleet-footprint-") as tmp:
        agent = agent_rss(model, Path(tmp), settle)
    log(f"  {agent / 2**20:.1f} MiB")
    result = {
        "benchmark": "footprint",
        "figures": {
            "agent_idle_rss_mib": round(agent / 2**20, 1),
            "agent_overhead_mib": round((agent - base) / 2**20, 1),
        },
        "baseline": {"llama_cpp_python_rss_mib": round(base / 2**20, 1)},
        "ratio": round(agent / base, 3),
        "target": TARGET,
        "settings": {"model": model.name, "n_ctx": N_CTX, "threads": THREADS, "settle_seconds": settle},
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
