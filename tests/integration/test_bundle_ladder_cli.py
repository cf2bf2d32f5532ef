"""fleetctl bundle build --quantize on the real SmolLM2 GGUF: variants measured, gated, signed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from edgefleet.controlplane.trust.keys import KeyDir

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]


def fleetctl(keys: KeyDir, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "edgefleet.controlplane.cli", *args, "--keys-dir", str(keys.path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_ladder_bundle_is_gated_signed_and_inspectable(
    keys: KeyDir, smollm2_path: Path, tmp_path: Path
) -> None:
    base = ["bundle", "build", str(smollm2_path), "--name", "smollm2", "--version", "3", "--quantize", "q4_0"]
    refused = fleetctl(keys, *base, "-o", str(tmp_path / "strict"), "--max-ppl-increase", "1")
    assert refused.returncode == 1
    assert "q4_0" in refused.stderr and "perplexity" in refused.stderr.lower()
    assert not (tmp_path / "strict" / "release.json").exists()

    built = fleetctl(keys, *base, "-o", str(tmp_path / "b"), "--max-ppl-increase", "1", "--warn-only")
    assert built.returncode == 0, built.stderr
    inspected = fleetctl(keys, "bundle", "inspect", str(tmp_path / "b"), "--json")
    assert inspected.returncode == 0, inspected.stderr
    manifest = json.loads(inspected.stdout)
    variants = {v["id"]: v for v in manifest["variants"]}
    assert set(variants) == {"gguf-q4_1", "gguf-q4_0"}
    source, q4_0 = variants["gguf-q4_1"], variants["gguf-q4_0"]
    assert source["qualityGate"] == "source" and q4_0["qualityGate"] == "warn"
    assert int(source["perplexityMilli"]) > 1000 and int(q4_0["perplexityMilli"]) > 1000
    assert int(q4_0["perplexityIncreaseBp"]) > 100
    assert int(q4_0["tokensPerSecondMilli"]) > 0
    assert int(q4_0["sizeBytes"]) < int(source["sizeBytes"])
    assert len(manifest["artifacts"]) == 2
