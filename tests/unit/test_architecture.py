"""The layering docs/architecture.md describes holds, and the checks that enforce it have teeth.

import-linter checks the contracts of ``[tool.importlinter]`` in pyproject.toml over the real
import graph; each contract is also shown to break when one forbidden import is added to that
graph, so a contract that names a module that no longer exists, or that can never fire, fails
here instead of passing quietly. Servicer bases are not imports import-linter can see (api
subclasses what the generated code defines), so an AST walk checks them.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grimp
import pytest
from importlinter.api import read_configuration
from importlinter.contracts.forbidden import ForbiddenContract
from importlinter.contracts.independence import IndependenceContract
from importlinter.contracts.layers import LayersContract
from importlinter.contracts.protected import ProtectedContract
from importlinter.domain.contract import Contract

REPO = Path(__file__).resolve().parents[2]
CONTROLPLANE = REPO / "controlplane"
SERVICERS_HOME = CONTROLPLANE / "api"
CONTRACT_TYPES: dict[str, type[Contract]] = {
    "forbidden": ForbiddenContract,
    "independence": IndependenceContract,
    "layers": LayersContract,
    "protected": ProtectedContract,
}

# One import each contract must refuse (importer -> imported). Package modules (__init__) only,
# so the cases survive modules moving inside their packages.
FORBIDDEN_IMPORTS = {
    "The agent and the control plane never import each other": (
        "edgefleet.controlplane.store",
        "edgefleet.agent.device",
    ),
    "protos imports neither the agent nor the control plane": ("edgefleet.protos.fleet", "edgefleet.agent"),
    "controlplane.store imports no other control-plane package": (
        "edgefleet.controlplane.store",
        "edgefleet.controlplane.trust",
    ),
    "controlplane.cli is the top layer: no other package imports it": (
        "edgefleet.controlplane.app",
        "edgefleet.controlplane.cli",
    ),
    "controlplane.app is imported only by controlplane.cli": (
        "edgefleet.controlplane.rollouts",
        "edgefleet.controlplane.app",
    ),
    "Control-plane packages import only the layers below them": (
        "edgefleet.controlplane.trust",
        "edgefleet.controlplane.fleet",
    ),
    "Agent packages import only the layers below them": (
        "edgefleet.agent.runtimes",
        "edgefleet.agent.update",
    ),
}


def configuration() -> dict[str, Any]:
    """The session and contract options as import-linter reads them from pyproject.toml."""
    return read_configuration(str(REPO / "pyproject.toml"))


def contracts_options() -> list[dict[str, Any]]:
    return list(configuration()["contracts_options"])


def contract_named(name: str) -> Contract:
    config = configuration()
    options = next(o for o in config["contracts_options"] if o["name"] == name)
    return CONTRACT_TYPES[options["type"]](
        name=name, session_options=config["session_options"], contract_options=options
    )


def test_lint_imports_keeps_every_contract() -> None:
    """What CI runs: every contract kept on the code as it is."""
    lint_imports = Path(sys.executable).with_name("lint-imports")
    result = subprocess.run(
        [str(lint_imports), "--no-cache"], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"Contracts: {len(FORBIDDEN_IMPORTS)} kept, 0 broken." in result.stdout, result.stdout


def test_every_contract_has_a_case_here() -> None:
    assert sorted(o["name"] for o in contracts_options()) == sorted(FORBIDDEN_IMPORTS)


@pytest.mark.parametrize(("name", "edge"), sorted(FORBIDDEN_IMPORTS.items()))
def test_contract_breaks_on_a_forbidden_import(name: str, edge: tuple[str, str]) -> None:
    contract = contract_named(name)
    graph = grimp.build_graph("edgefleet", cache_dir=None)
    assert contract.check(graph, verbose=False).kept, f"{name!r} is broken before any import is added"
    importer, imported = edge
    graph.add_import(importer=importer, imported=imported, line_number=1, line_contents=f"import {imported}")
    assert not contract.check(graph, verbose=False).kept, f"{name!r} let {importer} import {imported}"


def test_layers_place_every_package() -> None:
    """The layer contracts are exhaustive: a new agent or control-plane package fails them until
    it is given a layer (and a line in docs/architecture.md)."""
    layered = [o for o in contracts_options() if o["type"] == "layers"]
    assert sorted(c for o in layered for c in o["containers"]) == [
        "edgefleet.agent",
        "edgefleet.controlplane",
    ]
    assert all(o.get("exhaustive") == "True" for o in layered)


# -- servicers live in controlplane/api only ------------------------------------------------------


def _imported_names(tree: ast.Module) -> dict[str, str]:
    """Local name -> the dotted name it stands for, from the module's imports."""
    names: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.asname:  # import a.b as c: c is a.b
                    names[alias.asname] = alias.name
                else:  # import a.b: the name bound is a
                    top = alias.name.split(".")[0]
                    names[top] = top
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                names[alias.asname or alias.name] = f"{node.module}.{alias.name}"
    return names


def _dotted(node: ast.expr, names: dict[str, str]) -> str | None:
    parts: list[str] = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Subscript):  # Generic[...]-style bases
        return _dotted(node.value, names) if not parts else None
    if not isinstance(node, ast.Name):
        return None
    return ".".join([names.get(node.id, node.id), *reversed(parts)])


def is_servicer_base(dotted: str) -> bool:
    """A gRPC servicer base: ``*Servicer`` defined by generated ``*_pb2_grpc`` code or grpc_health."""
    module, _, name = dotted.rpartition(".")
    generated = module.rsplit(".", 1)[-1].endswith("_pb2_grpc") or module.split(".")[0] == "grpc_health"
    return name.endswith("Servicer") and generated


def servicer_classes(source: str) -> Iterator[tuple[str, int]]:
    """(class name, line) of every class in ``source`` deriving from a servicer base."""
    tree = ast.parse(source)
    names = _imported_names(tree)
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef):
            bases = [_dotted(base, names) for base in node.bases]
            if any(base is not None and is_servicer_base(base) for base in bases):
                yield node.name, node.lineno


def controlplane_servicers() -> dict[Path, list[str]]:
    found: dict[Path, list[str]] = {}
    for path in sorted(CONTROLPLANE.rglob("*.py")):
        if path.name.endswith(("_pb2.py", "_pb2_grpc.py")) or "__pycache__" in path.parts:
            continue
        classes = [name for name, _ in servicer_classes(path.read_text(encoding="utf-8"))]
        if classes:
            found[path.relative_to(REPO)] = classes
    return found


def test_only_controlplane_api_defines_servicers() -> None:
    found = controlplane_servicers()
    outside = {
        str(path): classes for path, classes in found.items() if SERVICERS_HOME not in (REPO / path).parents
    }
    assert not outside, f"gRPC servicers outside controlplane/api/: {outside}"
    inside = sorted(name for classes in found.values() for name in classes)
    assert {"DeviceService", "OperatorService"} <= set(inside), inside


@pytest.mark.parametrize(
    "source",
    [
        "from edgefleet.protos.fleet.v1 import operator_pb2_grpc\n"
        "class S(operator_pb2_grpc.OperatorServiceServicer): ...\n",
        "from edgefleet.protos.fleet.v1.device_pb2_grpc import DeviceServiceServicer as Base\n"
        "class S(Base): ...\n",
        "import edgefleet.protos.fleet.v1.device_pb2_grpc as grpc_code\n"
        "class S(grpc_code.DeviceServiceServicer): ...\n",
        "from grpc_health.v1 import health\nclass S(health.aio.HealthServicer): ...\n",
        "from grpc_health.v1 import health_pb2_grpc\nclass S(health_pb2_grpc.HealthServicer): ...\n",
    ],
)
def test_servicer_bases_are_recognised(source: str) -> None:
    assert [name for name, _ in servicer_classes(source)] == ["S"]


@pytest.mark.parametrize(
    "source",
    [
        "import grpc\nclass S(grpc.ServicerContext): ...\n",
        "from edgefleet.controlplane.api.auth import Servicer\nclass S(Servicer): ...\n",
        "class S(object): ...\n",
    ],
)
def test_other_bases_are_not_servicers(source: str) -> None:
    assert list(servicer_classes(source)) == []
