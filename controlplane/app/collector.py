"""Garbage-collector settings for a long-running control-plane process.

Ingestion allocates millions of short-lived containers (decoded records, insert parameters),
and with CPython's defaults the collector ran a young collection every 700 allocations and a
full one every few seconds, each full one walking everything the process ever loaded
(modules, SQLAlchemy's and protobuf's tables). Measured while draining a telemetry backlog:
2.4 s of 14 s in the collector; with these settings 0.5 s. Reference cycles are still
collected, only less often.
"""

from __future__ import annotations

import gc

YOUNG_THRESHOLD = 10_000  # allocations between young collections (CPython's default: 700)


def tune_for_serving() -> None:
    """Call once, after start-up: what is alive then lives as long as the process, so it is
    moved out of the collector's sight (gc.freeze), and young collections become rarer."""
    gc.freeze()
    gc.set_threshold(YOUNG_THRESHOLD)
