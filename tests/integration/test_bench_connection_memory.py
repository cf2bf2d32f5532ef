"""bench.connection_memory runs end to end at a tiny size: both servers start, their clients
connect over plaintext and mutual TLS, and the last line is the benchmark's JSON."""

from __future__ import annotations

import json

import pytest

from bench import connection_memory

pytestmark = pytest.mark.integration


def test_a_tiny_run_prints_both_figures(capsys: pytest.CaptureFixture[str]) -> None:
    connection_memory.main(["--connections", "20"])
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["benchmark"] == "connection_memory"
    assert line["figures"]["connections"] == 20
    assert line["figures"]["tls_kib_per_connection"] != 0
    assert "plaintext_kib_per_connection" in line["baseline"]
    assert line["target"] == 64.0 and isinstance(line["met"], bool)
