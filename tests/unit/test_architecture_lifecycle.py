"""The update lifecycle drawn in docs/architecture.md is the transition table the agent runs.

The doc lists the table one event a line (``event [crash-loop guard]: SOURCES -> TARGET``); the
agent's table is ``edgefleet.agent.update.lifecycle``. A rule added, removed or re-aimed on
either side without the other fails here, so a newcomer never reads a lifecycle the agent does
not have.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from edgefleet.agent.update.lifecycle import edges

DOC = Path(__file__).resolve().parents[2] / "docs" / "architecture.md"
PHASES = ("IDLE", "VERIFYING", "FETCHING", "INSTALLING", "TESTING", "ACTIVE", "FAILED", "ROLLED_BACK")
GUARD = " [crash-loop guard]"
LINE = re.compile(
    r"^(?P<event>[a-z_]+)(?P<guard> \[crash-loop guard\])?: (?P<sources>.+) -> (?P<target>\S+)$"
)

Edge = tuple[str, str, str, bool]  # source, event, target, guarded


def doc_block(text: str) -> list[str]:
    """The lines of the doc's one ```lifecycle block."""
    blocks = re.findall(r"^```lifecycle\n(.*?)^```$", text, flags=re.MULTILINE | re.DOTALL)
    assert len(blocks) == 1, f"expected one lifecycle block, found {len(blocks)}"
    return [line for line in blocks[0].splitlines() if line.strip()]


def edges_of(lines: list[str]) -> set[Edge]:
    """Every (source, event, target, guarded) edge the lines draw; "any" and "same" expanded."""
    drawn: set[Edge] = set()
    for line in lines:
        match = LINE.match(line)
        assert match, f"not a lifecycle line: {line!r}"
        sources = (
            PHASES if match["sources"] == "any" else tuple(s.strip() for s in match["sources"].split(","))
        )
        for source in sources:
            assert source in PHASES, f"{source!r} is not a phase ({line!r})"
            target = source if match["target"] == "same" else match["target"]
            drawn.add((source, match["event"], target, match["guard"] is not None))
    return drawn


def test_doc_draws_the_agents_transition_table() -> None:
    drawn = edges_of(doc_block(DOC.read_text(encoding="utf-8")))
    table = {(e.source, e.event, e.target, e.guarded) for e in edges()}
    assert drawn == table, (
        f"only in the doc: {sorted(drawn - table)}; only in the table: {sorted(table - drawn)}"
    )


@pytest.mark.parametrize(
    ("lines", "expected"),
    [
        (["fetched: FETCHING -> INSTALLING"], {("FETCHING", "fetched", "INSTALLING", False)}),
        (
            ["swapped_in: TESTING, FETCHING -> same"],
            {("TESTING", "swapped_in", "TESTING", False), ("FETCHING", "swapped_in", "FETCHING", False)},
        ),
        ([f"load_started{GUARD}: INSTALLING -> TESTING"], {("INSTALLING", "load_started", "TESTING", True)}),
    ],
)
def test_lines_are_read_as_drawn(lines: list[str], expected: set[Edge]) -> None:
    assert edges_of(lines) == expected


def test_any_is_every_phase() -> None:
    drawn = edges_of(["boot_serving: any -> ACTIVE"])
    assert {source for source, *_ in drawn} == set(PHASES)
