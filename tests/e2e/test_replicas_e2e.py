"""Three control-plane replicas behave as one control plane: three ``fleetctl serve`` processes
(A, B, C) on one PostgreSQL, one Mosquitto running deploy/mosquitto's production config (TLS
with the fleet CA, a ``crlfile`` the broker host's CRL timer installs from replica B's
``/crl.pem``) and one key directory made once by ``fleetctl keys init``; real agents serving
the real SmolLM2 GGUF.

C starts first, alone: the two agents enrolled through it know every replica
(``--controlplane C,A,B``, and C advertises the device addresses C,A,B) and hold desired-state
streams (``--desired-via stream``); because C was the only one up when they connected, their
streams are on C (gRPC's pick_first keeps a working connection). A and B start next, each with
one agent that knows only it and hears of changes through the broker (the default), announced
by whichever replica committed them: B for the deploy, the rollout's leader for its waves.

The tests run in order and continue one story:
1. a bundle pushed through A and deployed through B is installed and served by C's agents;
2. a device revoked through A loses its stream on C within the 1 s promise, and the broker
   refuses its certificate within the pull interval the CRL timer documents;
3. C is SIGKILLed in the middle of a rollout (after its first wave, before the second): its
   device reopens its stream on A or B, the rollout completes, no device is assigned or loads
   the release twice;
4. with C's broker session retired, every telemetry record the agents' outboxes let go of is in
   the database exactly once.

The figures measured on the way (revocation cut-off, broker refusal, failover, ...) are printed
at the end and written to ``figures.json`` in the fleet's work dir. Bounds given to deadlines are
generous so a loaded machine does not fail them; the figures say what was actually observed.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import grpc
import pytest
from sqlalchemy import create_engine, func
from sqlmodel import Session, col, select

from bench.services import throwaway_database
from edgefleet.agent.telemetry.outbox import Outbox
from edgefleet.controlplane.build.bundles import build_bundle
from edgefleet.controlplane.store.models import AuditEntry, TelemetryDeadLetter, TelemetryRecord
from edgefleet.controlplane.trust.ca import load_ca
from edgefleet.controlplane.trust.keys import KeyDir
from edgefleet.protos.fleet.v1 import common_pb2, operator_pb2
from tests.e2e.fleet_harness import REPO, client_for, fleetctl, wait_for
from tests.e2e.replica_harness import (
    Agent,
    CrlTimer,
    HeldStream,
    Replica,
    ReplicaFleet,
    broker_admits,
    timer_interval,
)
from tests.mqtt_tls import mosquitto_programs, start_tls_broker

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(mosquitto_programs() is None, reason="mosquitto is not installed: run dev/setup"),
]

BUNDLE = "smollm2"
ROLLOUT = "smollm2-2-everywhere"
STREAM_CUT_WITHIN = 5.0  # the promise is 1 s; the figure says what it was
SOAK = "5s"  # long enough to kill C between the first wave's update and the second wave's start


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory, postgres_admin_dsn: str) -> Iterator[ReplicaFleet]:
    work = tmp_path_factory.mktemp("replicas")
    keys = KeyDir(work / "keys")
    subprocess.run(
        [sys.executable, "-m", "edgefleet.controlplane.cli", "keys", "init", "--keys-dir", str(keys.path)],
        cwd=REPO,
        check=True,
        capture_output=True,
        timeout=120,
    )
    ca = load_ca(keys.path)
    assert ca is not None
    broker = start_tls_broker(work / "broker", ca)  # its certificate from the fleet CA, as devices expect
    try:
        with throwaway_database(postgres_admin_dsn) as db_url:
            replicas = {name: Replica(name, work) for name in "abc"}
            # C tells its devices every replica's device port, C first.
            replicas["c"].device_advertise = ",".join(replicas[n].device_target for n in "cab")
            cluster = ReplicaFleet(work, keys, db_url, broker, replicas)
            try:
                start_fleet(cluster)
                cluster.crl_timer = CrlTimer(broker, replicas["b"].crl_url, timer_interval())
                cluster.crl_timer.start()
                cluster.figures["crl_pull_interval_s"] = cluster.crl_timer.interval
                yield cluster
                assert not cluster.crl_timer.failures, cluster.crl_timer.failures
            finally:
                if cluster.crl_timer is not None:
                    cluster.crl_timer.stop()
                cluster.stop_all()
                cluster.print_logs()
                print(json.dumps(cluster.figures, indent=2))
                (work / "figures.json").write_text(json.dumps(cluster.figures, indent=2))
    finally:
        broker.stop()


def start_fleet(fleet: ReplicaFleet) -> None:
    """C and its two agents first (their streams land on C), then A and B with one agent each."""
    c = fleet.replicas["c"]
    fleet.start_replicas("c")  # alone on the empty database: it stores the roots and the admin
    token = fleet.fleetctl("token", "create", "--uses", "2", via="c").strip()
    every_replica = ",".join(fleet.replicas[n].target for n in "cab")
    on_c = [fleet.start_agent(every_replica, token, home="c", desired_via="stream") for _ in range(2)]
    wait_for(
        "C's agents to enroll and connect to C's device port",
        lambda: all(a.enrolled_id() and c.device_port in a.connected_ports() for a in on_c),
        timeout=120,
    )
    fleet.start_replicas("a", "b")
    for name in "ab":
        token = fleet.fleetctl("token", "create", via=name).strip()
        fleet.start_agent(fleet.replicas[name].target, token, home=name)
    wait_for("every agent to enroll", lambda: all(a.enrolled_id() for a in fleet.agents), timeout=120)


# -- helpers -----------------------------------------------------------------------------------


def devices(fleet: ReplicaFleet, via: str) -> dict[str, common_pb2.DeviceSummary]:
    with fleet.operator(via) as op:
        listed = op.ListDevices(operator_pb2.ListDevicesRequest(), timeout=10).devices
    return {d.device_id: d for d in listed}


def serving(fleet: ReplicaFleet, agents: list[Agent], version: int, via: str) -> bool:
    """Every one of ``agents`` reports ``BUNDLE@version`` active at the generation it was given."""
    listed = devices(fleet, via)
    wanted = common_pb2.BundleRef(name=BUNDLE, version=version)
    return all(
        (d := listed.get(a.device_id)) is not None
        and d.state == common_pb2.DEVICE_STATE_ACTIVE
        and d.applied_generation == d.desired_generation
        and d.active_bundle == wanted
        for a in agents
    )


def chat(agent: Agent) -> None:
    """A chat completion through the official openai client, from the agent's local API."""
    reply = client_for(agent.url, timeout=60).chat.completions.create(
        model=BUNDLE, messages=[{"role": "user", "content": "Hi"}], max_tokens=4, temperature=0
    )
    assert reply.usage is not None and reply.usage.completion_tokens > 0


def rollout(fleet: ReplicaFleet, via: str) -> operator_pb2.Rollout:
    with fleet.operator(via) as op:
        found: operator_pb2.Rollout = op.GetRollout(operator_pb2.GetRolloutRequest(name=ROLLOUT), timeout=10)
    return found


def push(fleet: ReplicaFleet, smollm2_path: Path, version: int, via: str) -> None:
    bundle = build_bundle(
        smollm2_path,
        name=BUNDLE,
        version=version,
        out=fleet.work / f"{BUNDLE}-{version}",
        signers=fleet.keys.release_signers(),
    )
    pushed = fleet.fleetctl("bundle", "push", str(bundle.path), "--keys-dir", str(fleet.keys.path), via=via)
    assert pushed.strip() == f"{BUNDLE}@{version}"


# -- the story ---------------------------------------------------------------------------------


def test_a_bundle_pushed_through_a_and_deployed_through_b_serves_on_the_agents_of_c(
    fleet: ReplicaFleet, smollm2_path: Path
) -> None:
    push(fleet, smollm2_path, 1, via="a")
    started = time.monotonic()
    deployed = fleet.fleetctl("deploy", f"{BUNDLE}@1", "--all", via="b").split()
    assert sorted(deployed) == sorted(a.device_id for a in fleet.agents)

    wait_for(f"every agent serving {BUNDLE}@1", lambda: serving(fleet, fleet.agents, 1, via="c"), timeout=240)
    fleet.figures["deploy_to_all_serving_s"] = round(time.monotonic() - started, 3)
    for agent in fleet.agents:
        chat(agent)
    c = fleet.replicas["c"]
    for agent in fleet.on("c"):  # installed through C, and still connected to it
        assert c.device_port in agent.connected_ports(), f"agent {agent.index} left C"


def test_a_device_revoked_through_a_is_cut_off_on_c_and_refused_by_the_broker(fleet: ReplicaFleet) -> None:
    c = fleet.replicas["c"]
    # Revoke the C agent with the lower id: the other then sorts after at least one more device
    # of the rollout below unless both C devices sort first, and so is not in its first wave.
    victim = min(fleet.on("c"), key=lambda a: a.device_id)
    victim_process = victim.proc
    assert victim_process is not None
    assert c.device_port in victim.connected_ports()
    stream = HeldStream(c.device_target, fleet.ca_pem, victim.certificate())
    try:
        assert stream.first(timeout=30).generation >= 1  # C registered the stream
        with fleet.operator("a") as op:
            request = operator_pb2.RevokeDeviceRequest(device_id=victim.device_id)
            called_at = time.monotonic()
            response = op.RevokeDevice(request, timeout=30)
        revoked_at = time.monotonic()
        assert response.revoked
        assert stream.ended.wait(STREAM_CUT_WITHIN), "C kept the revoked device's stream open"
        assert stream.code == grpc.StatusCode.UNAUTHENTICATED
        assert stream.ended_at is not None
        # C can end the stream before A's answer is back (negative); the call's own time, from
        # its start, bounds the cut-off from above.
        fleet.figures["revoke_call_s"] = round(revoked_at - called_at, 3)
        fleet.figures["revocation_stream_cutoff_after_return_s"] = round(stream.ended_at - revoked_at, 3)
        fleet.figures["revocation_stream_cutoff_from_call_s"] = round(stream.ended_at - called_at, 3)
    finally:
        stream.close()

    # The agent's own stream on C was refused the same way, and the agent stops for good.
    wait_for("the revoked agent to stop", lambda: not victim_process.alive, timeout=30, interval=0.05)
    fleet.figures["revoked_agent_stopped_s"] = round(time.monotonic() - revoked_at, 3)
    assert "DeviceRevoked" in victim.log.read_text(errors="replace")

    # The broker host's timer pulls B's CRL (B did not revoke: the CRL comes from the database).
    bound = timer_interval() + 15
    certificate = victim.certificate()
    refused_at = wait_for(
        "the broker to refuse the revoked device's certificate",
        lambda: time.monotonic() if not broker_admits(fleet.broker, fleet.ca_pem, certificate) else None,
        timeout=bound,
        interval=0.2,
    )
    fleet.figures["broker_refusal_s"] = round(refused_at - revoked_at, 3)
    assert fleet.crl_timer is not None
    reloads = [t for t in fleet.crl_timer.installs if t > revoked_at]
    fleet.figures["crl_reloaded_after_revocation_s"] = round(reloads[0] - revoked_at, 3) if reloads else None
    assert devices(fleet, via="b")[victim.device_id].revoked


def test_killing_c_mid_rollout_moves_its_device_and_the_rollout_completes_once(
    fleet: ReplicaFleet, smollm2_path: Path
) -> None:
    a, b, c = (fleet.replicas[n] for n in "abc")
    [on_c] = fleet.on("c")
    kept = [on_c, *fleet.on("a"), *fleet.on("b")]
    assert len(kept) == 3
    assert c.device_port in on_c.connected_ports()
    push(fleet, smollm2_path, 2, via="b")
    fleet.fleetctl(
        "rollout", "create", f"{BUNDLE}@2", "--name", ROLLOUT, "--waves", "1,3", "--soak", SOAK, via="a"
    )

    def first_wave_updated() -> operator_pb2.Rollout | None:
        now = rollout(fleet, via="a")
        assert now.current_wave == 0, f"the second wave started before C could be killed: {now}"
        updated = operator_pb2.ROLLOUT_DEVICE_STATE_UPDATED
        return now if any(d.wave == 0 and d.state == updated for d in now.devices) else None

    before = wait_for("the first wave to update", first_wave_updated, timeout=180, interval=0.1)
    first_wave = {d.device_id for d in before.devices if d.wave == 0}
    fleet.figures["c_device_in_first_wave"] = on_c.device_id in first_wave
    streams_before = on_c.desired_state_lines()
    killed_wall = datetime.now(UTC)
    c.kill()
    killed_at = time.monotonic()

    # Every new stream starts with the current state: a new line means it reopened, on A or B.
    moved_at = wait_for(
        "C's device to reopen its stream on another replica",
        lambda: time.monotonic() if on_c.desired_state_lines() > streams_before else None,
        timeout=60,
        interval=0.05,
    )
    fleet.figures["failover_stream_reopened_s"] = round(moved_at - killed_at, 3)
    wait_for(
        "C's device connected to A's or B's device port",
        lambda: on_c.connected_ports() & {a.device_port, b.device_port},
        timeout=30,
    )

    done = wait_for(
        "the rollout to complete",
        lambda: r if (r := rollout(fleet, via="a")).state == operator_pb2.ROLLOUT_STATE_COMPLETED else None,
        timeout=180,
    )
    fleet.figures["rollout_completed_after_kill_s"] = round(time.monotonic() - killed_at, 3)
    assert {d.device_id for d in done.devices} == {agent.device_id for agent in kept}
    assert all(d.state == operator_pb2.ROLLOUT_DEVICE_STATE_HEALTHY for d in done.devices), done.devices
    wait_for(f"every agent serving {BUNDLE}@2", lambda: serving(fleet, kept, 2, via="b"), timeout=60)
    chat(on_c)

    # Each device was assigned once, the second wave only after C had died.
    assigns = rollout_assignments(fleet)
    assert Counter(d for _, devs in assigns for d in devs) == Counter(agent.device_id for agent in kept)
    second_wave = [when for when, devs in assigns if not set(devs) <= first_wave]
    assert second_wave and all(when > killed_wall for when in second_wave), (assigns, killed_wall)
    leaders = [n for n in "ab" if fleet.replicas[n].log_lines("now drives rollouts")]
    fleet.figures["rollout_leader_before_kill"] = "c" if c.log_lines("now drives rollouts") else "a or b"
    fleet.figures["rollout_leaders_after_kill"] = leaders
    assert leaders, "no surviving replica drives rollouts"


def rollout_assignments(fleet: ReplicaFleet) -> list[tuple[datetime, list[str]]]:
    """(when, devices) of every ``rollout.assign`` audit entry of the rollout, oldest first."""
    engine = create_engine(fleet.db_url)
    try:
        with Session(engine) as session:
            entries = session.exec(
                select(AuditEntry)
                .where(AuditEntry.action == "rollout.assign", AuditEntry.target == ROLLOUT)
                .order_by(col(AuditEntry.seq))
            ).all()
            return [(_utc(e.time), sorted(dict(e.detail["devices"]))) for e in entries]
    finally:
        engine.dispose()


def _utc(when: datetime) -> datetime:
    return when if when.tzinfo else when.replace(tzinfo=UTC)


def test_every_record_the_agents_let_go_of_is_stored_exactly_once(fleet: ReplicaFleet) -> None:
    """C's broker session still holds its share of what was published after it died:
    ``fleetctl retire-replica`` (the procedure for a replica gone for good) stores it."""
    kept = [a for a in fleet.agents if a.proc is not None and a.proc.alive]
    for agent in kept:
        agent.stop()
    c = fleet.replicas["c"]
    fleetctl(
        "retire-replica", "c",
        "--mqtt", fleet.broker.controlplane_url,
        "--db", fleet.db_url,
        "--data-dir", str(c.data_dir),
        "--quiet", "2",
        token=fleet.operator_token,
        ca=fleet.keys.tls_ca_path,
    )  # fmt: skip

    sent: dict[str, set[int]] = {}  # acknowledged by the broker: gone from the outbox
    assigned: dict[str, int] = {}  # every seq the outbox ever handed out is below this
    for agent in kept:
        outbox = Outbox(agent.state_dir / "outbox.sqlite")
        try:
            assert outbox.dropped == 0 and outbox.discarded == 0, f"agent {agent.index} lost records"
            waiting = {item.seq for item in outbox.pending(limit=outbox.max_records)}
            assigned[agent.device_id] = outbox.next_seq
            sent[agent.device_id] = set(range(1, outbox.next_seq)) - waiting
        finally:
            outbox.close()

    engine = create_engine(fleet.db_url)
    try:

        def stored() -> dict[str, list[int]]:
            with Session(engine) as session:
                rows = session.exec(
                    select(TelemetryRecord.device_id, TelemetryRecord.seq).where(
                        col(TelemetryRecord.device_id).in_(list(sent))
                    )
                ).all()
            by_device: dict[str, list[int]] = {d: [] for d in sent}
            for device_id, seq in rows:
                by_device[device_id].append(seq)
            return by_device

        def complete() -> dict[str, list[int]] | None:
            now = stored()
            return now if all(sent[d] <= set(seqs) for d, seqs in now.items()) else None

        final = wait_for("every acknowledged record in the database", complete, timeout=60)
        for device_id, seqs in final.items():
            assert len(seqs) == len(set(seqs)), f"{device_id}: a record was stored twice"
            assert max(seqs) < assigned[device_id], f"{device_id}: a record no outbox handed out"
        fleet.figures["telemetry_records_checked"] = sum(len(s) for s in final.values())

        with Session(engine) as session:
            letters = session.exec(
                select(func.count())
                .select_from(TelemetryDeadLetter)
                .where(col(TelemetryDeadLetter.device_id).in_(list(sent)))
            ).one()
            assert letters == 0, "ingestion refused records of these devices"
            loads = session.exec(
                select(TelemetryRecord.device_id, TelemetryRecord.payload).where(
                    TelemetryRecord.kind == "deployment", col(TelemetryRecord.device_id).in_(list(sent))
                )
            ).all()
        loaded_v2 = Counter(
            device_id
            for device_id, payload in loads
            if str(payload.get("detail", "")).startswith(f"loading {BUNDLE}@2 ")
        )
        assert loaded_v2 == Counter(dict.fromkeys(sent, 1)), f"loads of {BUNDLE}@2: {loaded_v2}"
    finally:
        engine.dispose()
