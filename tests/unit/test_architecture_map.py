"""docs/architecture.md's package map names exactly the packages on disk.

The map is where a newcomer learns what each package owns and may import; a package added,
renamed or removed without its line changing makes the map lie, so this fails until it is fixed.
A package is a directory with an ``__init__.py`` under agent/, controlplane/ or protos/.
"""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DOC = REPO / "docs" / "architecture.md"
ROOTS = ("agent", "controlplane", "protos")
MAP_HEADING = "## Package map"
MAP_LINE = re.compile(r"^- `((?:agent|controlplane|protos)(?:/[A-Za-z_][A-Za-z0-9_]*)*)/` — \S")


def packages_on_disk(repo: Path) -> set[str]:
    return {
        init.parent.relative_to(repo).as_posix()
        for root in ROOTS
        for init in (repo / root).rglob("__init__.py")
        if "__pycache__" not in init.parts
    }


def packages_in_map(text: str) -> list[str]:
    """The package of every map line, in order (a package listed twice appears twice)."""
    section = text.split(MAP_HEADING, 1)[1].split("\n## ", 1)[0]
    return [match.group(1) for line in section.splitlines() if (match := MAP_LINE.match(line))]


def test_map_lists_every_package_once() -> None:
    listed = packages_in_map(DOC.read_text(encoding="utf-8"))
    on_disk = packages_on_disk(REPO)
    assert len(listed) == len(set(listed)), f"listed more than once: {sorted(listed)}"
    missing, stale = sorted(on_disk - set(listed)), sorted(set(listed) - on_disk)
    assert not missing and not stale, f"add to the map: {missing}; remove from the map: {stale}"


def test_a_new_package_is_noticed(tmp_path: Path) -> None:
    """The comparison sees a package the map does not name, and a map line with no package."""
    for package in ("agent/api", "controlplane/newjob"):
        (tmp_path / package).mkdir(parents=True)
        (tmp_path / package / "__init__.py").write_text("")
    (tmp_path / "agent" / "__init__.py").write_text("")
    (tmp_path / "agent" / "api" / "__pycache__").mkdir()
    text = f"{MAP_HEADING}\n\n- `agent/` — the agent.\n- `agent/api/` — HTTP.\n- `protos/gone/` — stale.\n"
    listed = set(packages_in_map(text + "\n## Data flow\n- `controlplane/x/` — not the map.\n"))
    assert listed == {"agent", "agent/api", "protos/gone"}
    assert packages_on_disk(tmp_path) - listed == {"controlplane/newjob"}
