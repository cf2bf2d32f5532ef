"""Writes the next migration after a change to models.py:

    python -m edgefleet.controlplane.store.migrations revision -m "what changed" [--db URL]

Alembic's autogenerate compares models.py with a database at head: by default a new SQLite file
that ``make_engine`` migrates there, so no server and no alembic.ini are needed; ``--db`` names
another database (an empty PostgreSQL one, say), which is migrated to head first. The revision
is numbered after the head, written to ``versions/`` of the package this runs from (a checkout
installed editable) and formatted with ruff. Review it: autogenerate sees tables, columns,
types, indexes and constraints, not renames or the data a change must move.
"""

from __future__ import annotations

import argparse
import tempfile
from collections.abc import Sequence
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.script import ScriptDirectory

from edgefleet.controlplane.store.engine import make_engine
from edgefleet.controlplane.store.migrate import alembic_config


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m edgefleet.controlplane.store.migrations")
    commands = parser.add_subparsers(dest="command", required=True)
    revision = commands.add_parser("revision", help="autogenerate the next revision from models.py")
    revision.add_argument("-m", "--message", required=True, help="what the revision changes")
    revision.add_argument("--db", help="compare with this database (default: a new SQLite file)")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as scratch:
        engine = make_engine(args.db or f"sqlite:///{Path(scratch) / 'head.sqlite3'}")
        try:
            with engine.begin() as conn:
                config = alembic_config(conn)
                _format_with_ruff(config)
                head = ScriptDirectory.from_config(config).get_current_head()
                next_id = f"{int(head or 0) + 1:04d}"
                command.revision(config, message=args.message, autogenerate=True, rev_id=next_id)
        finally:
            engine.dispose()


def _format_with_ruff(config: Config) -> None:
    """Alembic's post-write hooks: the new file passes ``ruff check`` and ``ruff format`` as
    written, instead of after a round of hand edits."""
    section = "post_write_hooks"
    hooks = {"fix": "check --fix --quiet", "format": "format --quiet"}
    config.set_section_option(section, "hooks", ", ".join(hooks))
    for name, options in hooks.items():
        config.set_section_option(section, f"{name}.type", "module")
        config.set_section_option(section, f"{name}.module", "ruff")
        config.set_section_option(section, f"{name}.options", f"{options} REVISION_SCRIPT_FILENAME")


if __name__ == "__main__":
    main()
