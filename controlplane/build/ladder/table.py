"""Renders ladder rows for people (a rich Table) and for scripts (JSON-able dicts).

``bundle inspect`` may show a ladder long after it was measured, from what the bundle
stored, so rows round-trip through :func:`row_to_dict` / :func:`row_from_dict`. JSON has no
NaN or infinity: non-finite numbers become null and come back as NaN.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import MappingProxyType
from typing import Any

from rich.table import Table
from rich.text import Text

from edgefleet.controlplane.build.ladder.types import (
    EvalConfig,
    GateStatus,
    LadderResult,
    LadderRow,
    ModelFormat,
)

_GATE_STYLES: MappingProxyType[GateStatus, str] = MappingProxyType(
    {
        GateStatus.SOURCE: "dim",
        GateStatus.PASS: "green",
        GateStatus.WARN: "yellow",
        GateStatus.FAIL: "bold red",
    }
)
_SIZE_UNITS = ("B", "KiB", "MiB", "GiB", "TiB")


def format_size(size_bytes: int) -> str:
    """Binary units with one decimal (253113024 -> "241.4 MiB")."""
    value = float(size_bytes)
    for unit in _SIZE_UNITS:
        if value < 1024 or unit == _SIZE_UNITS[-1]:
            return f"{size_bytes} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def _number(value: float, spec: str) -> str:
    return format(value, spec) if math.isfinite(value) else "n/a"


def _increase(row: LadderRow) -> str:
    if row.is_source:
        return "-"
    return f"{row.ppl_increase_pct:+.2f}%" if math.isfinite(row.ppl_increase_pct) else "n/a"


def _files(row: LadderRow) -> str:
    if not row.paths:
        return ""
    first = row.paths[0].name
    return first if len(row.paths) == 1 else f"{first} (+{len(row.paths) - 1})"


def ladder_table(rows: Sequence[LadderRow], *, title: str | None = None) -> Table:
    """One line per rung: size, perplexity, its change against the source, tok/s, gate."""
    table = Table(title=title)
    table.add_column("format")
    table.add_column("quantization")
    table.add_column("file")
    table.add_column("size", justify="right")
    table.add_column("perplexity", justify="right")
    table.add_column("Δ ppl", justify="right")
    table.add_column("tok/s", justify="right")
    table.add_column("gate")
    table.add_column("note")
    for row in rows:
        table.add_row(
            str(row.format),
            row.quantization,
            _files(row),
            format_size(row.size_bytes),
            _number(row.perplexity, ".3f"),
            _increase(row),
            _number(row.tokens_per_second, ".1f"),
            Text(str(row.gate), style=_GATE_STYLES[row.gate]),
            row.note,
        )
    return table


def result_table(result: LadderResult) -> Table:
    """The ladder with its limit in the title, as `fleetctl bundle build` prints it."""
    mode = "warn only" if result.warn_only else "refuse"
    title = (
        f"{result.source.name}: max perplexity increase {result.max_ppl_increase_pct:g}% ({mode}), "
        f"n_ctx {result.eval_config.n_ctx}, {result.n_threads} thread(s)"
    )
    return ladder_table(result.rows, title=title)


def _finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None


def _float_or_nan(value: object) -> float:
    return float(value) if isinstance(value, int | float) else math.nan


def row_to_dict(row: LadderRow) -> dict[str, Any]:
    """A JSON-able dict (paths as strings, non-finite numbers as null)."""
    return {
        "format": str(row.format),
        "quantization": row.quantization,
        "paths": [str(path) for path in row.paths],
        "size_bytes": row.size_bytes,
        "perplexity": _finite_or_none(row.perplexity),
        "ppl_increase_pct": _finite_or_none(row.ppl_increase_pct),
        "tokens_per_second": _finite_or_none(row.tokens_per_second),
        "gate": str(row.gate),
        "note": row.note,
        "tokens_scored": row.tokens_scored,
    }


def row_from_dict(data: Mapping[str, Any]) -> LadderRow:
    """Inverse of :func:`row_to_dict`; raises KeyError/ValueError on a malformed dict."""
    return LadderRow(
        format=ModelFormat(data["format"]),
        quantization=str(data["quantization"]),
        paths=tuple(Path(p) for p in data["paths"]),
        size_bytes=int(data["size_bytes"]),
        perplexity=_float_or_nan(data["perplexity"]),
        ppl_increase_pct=_float_or_nan(data["ppl_increase_pct"]),
        tokens_per_second=_float_or_nan(data["tokens_per_second"]),
        gate=GateStatus(data["gate"]),
        note=str(data.get("note", "")),
        tokens_scored=int(data.get("tokens_scored", 0)),
    )


def result_to_dict(result: LadderResult) -> dict[str, Any]:
    """The whole ladder with the settings it was measured and gated under."""
    config = result.eval_config
    return {
        "source": str(result.source),
        "format": str(result.format),
        "max_ppl_increase_pct": result.max_ppl_increase_pct,
        "warn_only": result.warn_only,
        "n_threads": result.n_threads,
        "eval": {
            "n_ctx": config.n_ctx,
            "max_windows": config.max_windows,
            "prompt_tokens": config.prompt_tokens,
            "gen_tokens": config.gen_tokens,
        },
        "rows": [row_to_dict(row) for row in result.rows],
    }


def result_from_dict(data: Mapping[str, Any]) -> LadderResult:
    """Inverse of :func:`result_to_dict`."""
    config = data["eval"]
    return LadderResult(
        source=Path(data["source"]),
        format=ModelFormat(data["format"]),
        rows=tuple(row_from_dict(row) for row in data["rows"]),
        max_ppl_increase_pct=float(data["max_ppl_increase_pct"]),
        warn_only=bool(data["warn_only"]),
        eval_config=EvalConfig(
            n_ctx=int(config["n_ctx"]),
            max_windows=None if config["max_windows"] is None else int(config["max_windows"]),
            prompt_tokens=int(config["prompt_tokens"]),
            gen_tokens=int(config["gen_tokens"]),
        ),
        n_threads=int(data["n_threads"]),
    )
