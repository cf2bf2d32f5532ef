"""bench.replicas at a tiny size on the real parts (PostgreSQL, Mosquitto, three replicas in
this process, simulated devices over mutual TLS): every phase runs and the summary judges all
three targets. Figures at this size mean nothing; what is checked is that each phase measured
what it says it did, so `python -m bench.replicas` does not fail only after minutes of setup."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.replicas import Config, measure, report_lines, summary
from bench.sim_bundle import build_sim_bundle
from edgefleet.controlplane.trust.keys import KeyDir
from tests.conftest import start_broker

pytestmark = pytest.mark.integration

TINY = Config(devices=6, rounds=2, interval_s=1.0, blob_rounds=1, settle_s=0.0)


@pytest.fixture(scope="module")
def mosquitto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A broker of this module's own: the replicas' ingestors join the shared subscription and
    keep their sessions there once stopped, so on the session-wide broker they would hold back
    part of other tests' telemetry."""
    broker = start_broker(tmp_path_factory.mktemp("bench-replicas-broker"))
    yield broker.url
    broker.stop()


async def test_every_phase_measures_and_the_summary_judges_all_targets(
    postgres_database: str, mosquitto: str, keys: KeyDir, tmp_path: Path
) -> None:
    bundle = build_sim_bundle(tmp_path / "bundle", keys.release_signers(), name="blobbench")
    results = await measure(
        TINY, db_url=postgres_database, mqtt_url=mosquitto, keys=keys, work=tmp_path / "run", bundle=bundle
    )
    line = summary(results, TINY, {"in_process": True})
    figures = line["figures"]
    assert figures["fleet"]["per_replica"] == [2, 2, 2]
    delivery = figures["delivery"]
    assert delivery["cross_replica"]["n"] == TINY.rounds
    assert delivery["same_replica"]["n"] == TINY.rounds
    assert delivery["deploy_to_all"]["n"] == TINY.devices
    assert figures["downloads"]["rounds"] == TINY.blob_rounds
    idle = figures["idle"]
    assert idle["commits_per_s_total_per_device"] == pytest.approx(
        idle["commits_per_s_with_devices"] / TINY.devices, abs=1e-4
    )
    assert set(line["met_each"]) == {"delivery_p99", "idle_commits_per_device", "download_ratio"}
    assert line["met"] == all(line["met_each"].values())
    assert report_lines(line)[-1].startswith("all targets: ")
    json.loads(json.dumps(line))
