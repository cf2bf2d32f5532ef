"""Regenerates the Python code of the wire contract from protos/fleet/v1/*.proto.

Run from anywhere as ``python -m edgefleet.protos.generate``. The generated ``*_pb2.py``,
``*_pb2_grpc.py`` and ``*_pb2.pyi`` files are committed; ``tests/unit/test_protos_generated.py``
regenerates them into a temporary directory and fails if they differ, so the committed code
can never drift from the ``.proto`` sources.
"""

from __future__ import annotations

import argparse
import sys
from importlib import resources
from pathlib import Path

from grpc_tools import protoc

REPO_ROOT = Path(__file__).resolve().parent.parent
# Sources are named by their import path, edgefleet/protos/fleet/v1/*.proto, so generated modules
# import each other as edgefleet.protos.fleet.v1.*.
PROTO_DIR = REPO_ROOT / "edgefleet" / "protos" / "fleet" / "v1"


class ProtocError(RuntimeError):
    """protoc rejected the sources; its diagnostics were printed to stderr."""


def proto_sources() -> list[Path]:
    """All contract sources, sorted so the output is deterministic."""
    return sorted(PROTO_DIR.glob("*.proto"))


def generate(out_dir: Path) -> list[Path]:
    """Writes generated modules for every source under ``out_dir`` (mirroring ``protos/``)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    well_known = resources.files("grpc_tools") / "_proto"
    sources = [str(p.relative_to(REPO_ROOT)) for p in proto_sources()]
    args = [
        "grpc_tools.protoc",
        f"-I{REPO_ROOT}",
        f"-I{well_known}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *sources,
    ]
    if protoc.main(args) != 0:
        raise ProtocError(f"protoc failed for {sources}")
    return sorted((out_dir / "edgefleet" / "protos" / "fleet" / "v1").glob("*_pb2*.py*"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO_ROOT, help="output root (default: repository)")
    args = parser.parse_args(argv)
    for path in generate(args.out):
        print(path.relative_to(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
