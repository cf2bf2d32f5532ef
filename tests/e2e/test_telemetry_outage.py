"""Telemetry loses nothing and duplicates nothing across outages: two real agents serve requests
without pause while the broker is stopped for a while and, later, the control plane; once
both are back, the database holds every record each agent produced exactly once, and the
requests its inference summaries account for are the requests the clients made."""

from __future__ import annotations

import json
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from sqlalchemy import create_engine, text

from edgefleet.controlplane.build.bundles import build_bundle
from edgefleet.controlplane.trust.keys import KeyDir, init_keys
from edgefleet.protos.fleet.v1 import common_pb2
from tests.conftest import Broker, free_port, start_broker
from tests.e2e.fleet_harness import Fleet, client_for, wait_for

pytestmark = pytest.mark.e2e

OUTAGE_S = 8.0


@pytest.fixture
def fleet(tmp_path: Path, smollm2_path: Path) -> Iterator[tuple[Fleet, Broker]]:
    keys: KeyDir = init_keys(tmp_path / "keys")
    broker = start_broker(tmp_path / "broker")
    bundle = build_bundle(
        smollm2_path, name="smollm2", version=1, out=tmp_path / "b", signers=keys.release_signers()
    )
    fleet = Fleet(
        target=f"127.0.0.1:{free_port()}",
        data_dir=tmp_path / "cp",
        work=tmp_path,
        keys=keys,
        mqtt=broker.url,
        agent_ports=[free_port(), free_port()],
    )
    fleet.start_controlplane()
    try:
        fleet.push_bundle(bundle.path)
        token = fleet.fleetctl("token", "create", "--uses", "2").strip()
        fleet.agents = [fleet.start_agent(i, token) for i in range(2)]
        wait_for("two enrolled devices", lambda: len(fleet.devices()) == 2, timeout=60)
        fleet.fleetctl("deploy", "smollm2@1", "--all")
        wait_for(
            "both devices serving",
            lambda: all(d.state == common_pb2.DEVICE_STATE_ACTIVE for d in fleet.devices()),
            timeout=240,
        )
        yield fleet, broker
    finally:
        fleet.stop_all()
        broker.stop()
        fleet.print_logs()


class Traffic:
    """Keeps every agent busy with small chat requests and counts the ones that succeeded."""

    def __init__(self, urls: list[str]) -> None:
        self.served = dict.fromkeys(urls, 0)
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(url,), daemon=True) for url in urls]

    def _run(self, url: str) -> None:
        client = client_for(url, timeout=60)
        while not self._stop.is_set():
            try:
                client.chat.completions.create(
                    model="smollm2", messages=[{"role": "user", "content": "Hi"}], max_tokens=3, temperature=0
                )
            except openai.APIError as exc:
                raise AssertionError(f"{url} failed a request during the outage: {exc}") from exc
            self.served[url] += 1
            time.sleep(0.2)

    def __enter__(self) -> Traffic:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(60)


def telemetry_counters(url: str) -> dict[str, int]:
    return dict(httpx.get(f"{url}/healthz", timeout=10).json()["telemetry"])


def stored(fleet: Fleet, device_id: str) -> list[tuple[int, str, dict[str, object]]]:
    engine = create_engine(f"sqlite:///{fleet.data_dir / 'controlplane.db'}")
    try:
        with engine.connect() as conn:
            rows = conn.execute(
                text("SELECT seq, kind, payload FROM telemetryrecord WHERE device_id = :d ORDER BY seq"),
                {"d": device_id},
            ).all()
    finally:
        engine.dispose()
    return [
        (int(seq), kind, json.loads(payload) if isinstance(payload, str) else payload)
        for seq, kind, payload in rows
    ]


def test_every_record_arrives_exactly_once_after_broker_and_controlplane_outages(
    fleet: tuple[Fleet, Broker],
) -> None:
    cluster, broker = fleet
    devices = {d.api_url: d.device_id for d in cluster.devices()}
    with Traffic(list(devices)) as traffic:
        time.sleep(3)
        broker.stop()
        time.sleep(OUTAGE_S)
        broker.start()  # same port; persistent sessions and retained messages survive
        time.sleep(3)
        cluster.controlplane.stop()
        time.sleep(OUTAGE_S)
        cluster.start_controlplane()
        time.sleep(3)
    assert all(n > 10 for n in traffic.served.values()), traffic.served

    for url, device_id in devices.items():
        # Every request's figures are flushed into the outbox and the outbox is drained.
        counters = wait_for(
            f"{device_id}'s telemetry drained",
            lambda u=url: (
                c if (c := telemetry_counters(u))["pending"] == 0 and c["inference_pending"] == 0 else None
            ),
            timeout=60,
        )
        assert counters["dropped"] == 0 and counters["lost"] == 0 and counters["requests_lost"] == 0
        produced = counters["produced"]

        def all_stored(
            d: str = device_id, p: int = produced
        ) -> list[tuple[int, str, dict[str, object]]] | None:
            rows = [r for r in stored(cluster, d) if r[0] <= p]
            return rows if len(rows) == p else None

        rows = wait_for(f"{device_id}'s {produced} records in the database", all_stored, timeout=120)
        assert [seq for seq, _, _ in rows] == list(range(1, produced + 1)), "a record is missing or repeated"
        reported = sum(int(str(payload["requests"])) for _, kind, payload in rows if kind == "inference")
        assert reported == traffic.served[url], f"{device_id}: summaries count {reported} requests"


def test_an_agent_killed_mid_publish_loses_nothing_from_its_outbox(fleet: tuple[Fleet, Broker]) -> None:
    """The broker is frozen (SIGSTOP), so the agent's messages go out but no PUBACK comes back;
    the agent is SIGKILLed with them in flight, started again, and the broker resumed. The
    records that were in flight may reach the database twice (the dead connection's packets
    were in the broker's socket buffer, and the new agent sends them again): stored once."""
    cluster, broker = fleet
    url = cluster.agent_url(0)
    device_id = next(d.device_id for d in cluster.devices() if d.api_url == url)
    assert broker.proc is not None
    with Traffic([url]):
        time.sleep(2)
        broker.proc.send_signal(signal.SIGSTOP)
        try:
            wait_for(
                "records in flight to the frozen broker",
                lambda: telemetry_counters(url)["pending"] >= 5 or None,
                timeout=30,
            )
        except BaseException:
            broker.proc.send_signal(signal.SIGCONT)
            raise
    cluster.agents[0].kill()
    cluster.agents[0] = cluster.start_agent(0, token=None)
    broker.proc.send_signal(signal.SIGCONT)

    counters = wait_for(
        "the restarted agent's telemetry drained",
        lambda: c if (c := _counters_or_none(url)) and c["pending"] == 0 else None,
        timeout=120,
    )
    assert counters["dropped"] == 0 and counters["lost"] == 0
    produced = counters["produced"]
    rows = wait_for(
        f"{device_id}'s {produced} records in the database",
        lambda: (
            r if len(r := [x for x in stored(cluster, device_id) if x[0] <= produced]) == produced else None
        ),
        timeout=120,
    )
    assert [seq for seq, _, _ in rows] == list(range(1, produced + 1)), "a record is missing or repeated"


def _counters_or_none(url: str) -> dict[str, int] | None:
    """The agent's telemetry counters, or None while it is not answering (or not counting) yet."""
    try:
        counters = httpx.get(f"{url}/healthz", timeout=10).json().get("telemetry")
    except httpx.HTTPError:
        return None
    return dict(counters) if counters else None
