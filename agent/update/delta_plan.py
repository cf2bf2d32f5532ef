"""What a chunked download does, decided before any byte moves: pure, so it is tested alone.

An artifact with a signed chunk list is assembled front to back into its part file. Each chunk
is either copied from a file already on the device that holds a chunk with the same hash (an
installed artifact, or an earlier position of the part file itself when the artifact repeats a
chunk), or fetched from the control plane; consecutive fetched chunks share one ranged request.
A download that was interrupted resumes after the chunks its part file already holds (checked
again by hash before the plan is made: :func:`.delta_fetch.verified_prefix`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from edgefleet.protos.fleet.chunking import Chunk


@dataclass(frozen=True, slots=True)
class HeldChunk:
    """Where the device holds bytes said to hash to a chunk's sha256: ``length`` bytes at
    ``offset`` of ``path`` (None: the part file being assembled). Said, not known: the bytes are
    hashed again as they are copied."""

    path: Path | None
    offset: int
    length: int


@dataclass(frozen=True, slots=True)
class Copy:
    """Copy ``chunk`` from ``source`` (verified against ``chunk.sha256`` while copied)."""

    chunk: Chunk
    source: HeldChunk


@dataclass(frozen=True, slots=True)
class Fetch:
    """Fetch consecutive ``chunks`` from the control plane in one ranged request."""

    chunks: tuple[Chunk, ...]

    @property
    def offset(self) -> int:
        return self.chunks[0].offset

    @property
    def length(self) -> int:
        return self.chunks[-1].end - self.chunks[0].offset


Step = Copy | Fetch


@dataclass(frozen=True, slots=True)
class Plan:
    """The steps after the first ``done`` chunks, and the bytes each kind of step moves."""

    done: int
    steps: tuple[Step, ...]

    @property
    def fetch_bytes(self) -> int:
        return sum(step.length for step in self.steps if isinstance(step, Fetch))

    @property
    def copy_bytes(self) -> int:
        return sum(step.chunk.length for step in self.steps if isinstance(step, Copy))


def plan_chunks(
    chunks: Sequence[Chunk], held: Mapping[str, HeldChunk], *, done: int = 0, max_fetch_bytes: int = 64 << 20
) -> Plan:
    """The steps that assemble ``chunks[done:]``: a chunk whose hash ``held`` names (with the
    same length) is copied, a chunk repeated from earlier in the artifact is copied from the part
    file, and runs of the others are fetched, at most ``max_fetch_bytes`` per request (longer
    runs split at chunk boundaries, so a dropped stream loses little)."""
    earlier: dict[str, HeldChunk] = {}
    for chunk in chunks[:done]:
        earlier.setdefault(chunk.sha256, HeldChunk(None, chunk.offset, chunk.length))
    steps: list[Step] = []
    run: list[Chunk] = []

    def close_run() -> None:
        if run:
            steps.append(Fetch(tuple(run)))
            run.clear()

    for chunk in chunks[done:]:
        source = held.get(chunk.sha256) or earlier.get(chunk.sha256)
        if source is not None and source.length == chunk.length:
            close_run()
            steps.append(Copy(chunk, source))
        else:
            if run and chunk.end - run[0].offset > max_fetch_bytes:
                close_run()
            run.append(chunk)
        earlier.setdefault(chunk.sha256, HeldChunk(None, chunk.offset, chunk.length))
    close_run()
    return Plan(done=done, steps=tuple(steps))
