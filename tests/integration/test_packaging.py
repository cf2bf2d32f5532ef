"""Installing edgefleet puts one name into site-packages: ``edgefleet`` (and its console scripts).

agent/, controlplane/ and protos/ stay top-level folders of the repository but install as
edgefleet.agent, edgefleet.controlplane and edgefleet.protos; bench/ and tests/ are not
installed, so nothing generic (``agent``, ``protos``, ``bench``) collides with other packages.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.integration


def _pip(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "pip", *args], check=True, capture_output=True, timeout=300)


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    wheels = tmp_path_factory.mktemp("wheels")
    _pip("wheel", "--no-deps", "--no-build-isolation", "--wheel-dir", str(wheels), str(REPO))
    (wheel,) = wheels.glob("edgefleet-*.whl")
    target = tmp_path_factory.mktemp("site")
    _pip("install", "--no-deps", "--no-index", "--target", str(target), str(wheel))
    return target


def test_only_edgefleet_lands_in_site_packages(installed: Path) -> None:
    names = {path.name for path in installed.iterdir()}
    assert names - {"bin"} == {"edgefleet", "edgefleet-0.1.0.dist-info"}
    assert {path.name for path in (installed / "edgefleet").iterdir()} >= {"agent", "controlplane", "protos"}


def test_console_scripts_and_data_files_are_installed(installed: Path) -> None:
    assert {path.name for path in (installed / "bin").iterdir()} == {"fleetctl", "fleet-agent"}
    package = installed / "edgefleet"
    for data in (
        "protos/fleet/v1/telemetry.proto",
        "controlplane/build/ladder/data/eval.txt",
        "controlplane/store/migrations/script.py.mako",
    ):
        assert (package / data).is_file(), data


def test_the_installed_package_imports_without_the_repository(installed: Path, tmp_path: Path) -> None:
    """From another directory, with only the installed copy on the path (plus the dependencies)."""
    probe = (
        "import edgefleet.agent.cli, edgefleet.controlplane.cli.main, edgefleet.protos.fleet.v1.device_pb2;"
        "import edgefleet.controlplane.store.migrate as m; print(m.__file__)"
    )
    done = subprocess.run(
        [sys.executable, "-c", f"import sys; sys.path.insert(0, {str(installed)!r}); {probe}"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().startswith(str(installed))
