"""A deploy or a rollout wave to many devices, on SQLite and on a real PostgreSQL, writes every
device's rows in bulk and signs every device's director metadata in one batch: the rows and
the metadata are what a deploy to each device alone would give, the number of statements does
not grow with the number of devices, objects the session already holds read the new values
(and the old ones again once a savepoint holding the writes rolls back), a refusal stores
nothing, and a rollout wave whose batch is refused assigns its devices one by one."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event
from sqlalchemy.engine import Engine
from sqlmodel import Session, col, select
from tuf.api.metadata import Metadata, MetaFile, Root, Snapshot, TargetFile, Targets, Timestamp

from edgefleet.controlplane.fleet import deployments as commands
from edgefleet.controlplane.rollouts import commands as rollout_commands
from edgefleet.controlplane.rollouts import states
from edgefleet.controlplane.rollouts.convert import RolloutSpec
from edgefleet.controlplane.rollouts.engine import EngineConfig, RolloutMachine
from edgefleet.controlplane.rollouts.gates import Thresholds
from edgefleet.controlplane.rollouts.waves import WaveSize
from edgefleet.controlplane.store import deployments, devices
from edgefleet.controlplane.store.engine import make_engine
from edgefleet.controlplane.store.models import (
    Bundle,
    Deployment,
    Device,
    DeviceModel,
    RolloutDevice,
    TufMetadata,
    utcnow,
)
from edgefleet.controlplane.trust.director_rows import Assignment
from edgefleet.controlplane.trust.keys import KeyDir
from edgefleet.controlplane.trust.repositories import Repositories, RepositoryRefusal
from edgefleet.protos.fleet import uptane
from edgefleet.protos.fleet.uptane import DIRECTOR
from edgefleet.protos.fleet.v1 import bundle_pb2, common_pb2

pytestmark = pytest.mark.integration

RELEASES = [("alpha", 1), ("alpha", 2), ("beta", 1)]
ROLES = ("targets", "snapshot", "timestamp")


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'controlplane.sqlite3'}"


@pytest.fixture(params=["sqlite", "postgres"])
def engine(request: pytest.FixtureRequest) -> Iterator[Engine]:
    url = str(request.getfixturevalue("sqlite_url" if request.param == "sqlite" else "postgres_database"))
    eng = make_engine(url)
    yield eng
    eng.dispose()


@pytest.fixture
def repositories(engine: Engine, keys: KeyDir) -> Repositories:
    """Both roots stored, RELEASES in the image repository (one artifact each) and as bundles."""
    repos = Repositories(keys)
    with Session(engine) as s, s.begin():
        repos.bootstrap(s)
        image = Targets(version=1, expires=datetime.now(UTC) + timedelta(days=30))
        for name, version in RELEASES:
            path = uptane.image_target_path(name, version, "model.gguf")
            custom = uptane.image_target_custom(name, version, bundle_pb2.Variant(id=f"{name}-{version}"))
            image.targets[path] = TargetFile(
                100 + version, {"sha256": f"{version:064x}"}, path, unrecognized_fields={"custom": custom}
            )
            s.add(
                Bundle(
                    name=name,
                    version=version,
                    release_metadata=b"{}",
                    manifest_json="{}",
                    expires_at=utcnow() + timedelta(days=1),
                )
            )
        signed = Metadata(image)
        for signer in keys.release_signers():
            signed.sign(signer, append=True)
        repos.publish_image_targets(s, signed.to_bytes(), release=None)
    return repos


def enroll(engine: Engine, ids: list[str], config: dict[str, Any] | None = None) -> None:
    with Session(engine) as s, s.begin():
        for device_id in ids:
            device = devices.create_device(s, device_id=device_id, hostname="h", labels={})
            device.config = dict(config or {})


def deploy(
    engine: Engine, repos: Repositories, name: str, version: int, ids: list[str] | None
) -> list[deployments.DeployedTo]:
    with Session(engine, expire_on_commit=False) as s, s.begin():
        return commands.deploy(s, repos, actor="t", name=name, version=version, device_ids=ids)


def latest(session: Session, device_id: str, role: str) -> Metadata[Any]:
    row = session.exec(
        select(TufMetadata)
        .where(
            TufMetadata.repository == DIRECTOR, TufMetadata.device_id == device_id, TufMetadata.role == role
        )
        .order_by(col(TufMetadata.version).desc())
    ).first()
    assert row is not None
    return Metadata.from_bytes(row.data)


def director_versions(engine: Engine, device_id: str) -> dict[str, int]:
    with Session(engine) as s:
        return {role: latest(s, device_id, role).signed.version for role in ROLES}


def check_director(engine: Engine, device_id: str, generation: int, releases: list[tuple[str, int]]) -> None:
    """The device's latest director metadata: signed by the director root's keys, each role
    naming the version of the one it covers, and saying what the deploy assigned."""
    with Session(engine) as s:
        root_row = s.exec(
            select(TufMetadata)
            .where(
                TufMetadata.repository == DIRECTOR, TufMetadata.device_id == "", TufMetadata.role == "root"
            )
            .order_by(col(TufMetadata.version).desc())
        ).first()
        assert root_row is not None
        root = Metadata[Root].from_bytes(root_row.data).signed
        targets, snapshot, timestamp = (latest(s, device_id, role) for role in ROLES)
    for role, metadata in zip(ROLES, (targets, snapshot, timestamp), strict=True):
        root.verify_delegate(role, metadata.signed_bytes, metadata.signatures)
    assert isinstance(targets.signed, Targets)
    assert isinstance(snapshot.signed, Snapshot)
    assert isinstance(timestamp.signed, Timestamp)
    assert snapshot.signed.meta["targets.json"] == MetaFile(version=targets.signed.version)
    assert timestamp.signed.snapshot_meta == MetaFile(version=snapshot.signed.version)
    assignment = uptane.parse_director_targets(targets.signed)
    assert (assignment.device_id, assignment.generation) == (device_id, generation)
    assert list(assignment.releases) == sorted(releases)
    assert set(assignment.targets) == {uptane.image_target_path(n, v, "model.gguf") for n, v in releases}


def test_a_deploy_to_many_devices_gives_each_what_a_deploy_to_it_alone_would(
    engine: Engine, repositories: Repositories
) -> None:
    ids = [f"dev-{i:02d}" for i in range(30)]
    enroll(engine, ids)
    deploy(engine, repositories, "alpha", 1, ids[:10])
    deploy(engine, repositories, "beta", 1, ids[5:15])
    before = {device_id: director_versions(engine, device_id) for device_id in ids[:15]}

    moved = deploy(engine, repositories, "alpha", 2, None)

    expected = {
        device_id: sorted([("alpha", 2), *([("beta", 1)] if 5 <= i < 15 else [])])
        for i, device_id in enumerate(ids)
    }
    generations = {device_id: 1 + (i < 10) + (5 <= i < 15) for i, device_id in enumerate(ids)}
    assert {m.device_id: (m.generation, m.releases) for m in moved} == {
        d: (generations[d], expected[d]) for d in ids
    }
    with Session(engine) as s:
        alpha2 = s.exec(select(Bundle.id).where(Bundle.name == "alpha", Bundle.version == 2)).one()
        rows = s.exec(select(Device)).all()
        assert {d.id: (d.desired_generation, d.desired_bundle_id) for d in rows} == {
            d: (generations[d], alpha2) for d in ids
        }
        assert deployments.assigned_models(s) == expected
        recorded = s.exec(select(Deployment.device_id, Deployment.generation, Deployment.bundle_id)).all()
        assert {(d, generations[d], alpha2) for d in ids} <= set(recorded)
    for device_id in ids:
        check_director(engine, device_id, generations[device_id], expected[device_id])
        old = before.get(device_id, {role: 0 for role in ROLES})
        assert director_versions(engine, device_id) == {role: old[role] + 1 for role in ROLES}


def statements_of(engine: Engine, work: Any) -> int:
    """How many statements ``work`` sends to the database."""
    sent: list[str] = []

    def count(*args: Any) -> None:
        sent.append(args[2])

    event.listen(engine, "before_cursor_execute", count)
    try:
        work()
    finally:
        event.remove(engine, "before_cursor_execute", count)
    return len(sent)


def test_the_statements_of_a_deploy_do_not_grow_with_the_devices(
    engine: Engine, repositories: Repositories
) -> None:
    few, many = [f"few-{i}" for i in range(3)], [f"many-{i:02d}" for i in range(40)]
    enroll(engine, few + many)
    for ids in (few, many):
        deploy(engine, repositories, "beta", 1, ids)  # both hold a model and director metadata
    for_few = statements_of(engine, lambda: deploy(engine, repositories, "alpha", 1, few))
    for_many = statements_of(engine, lambda: deploy(engine, repositories, "alpha", 1, many))
    assert for_many == for_few


def test_objects_the_session_holds_read_the_deploy_and_forget_it_when_its_savepoint_rolls_back(
    engine: Engine, repositories: Repositories
) -> None:
    enroll(engine, ["dev-a"])
    deploy(engine, repositories, "alpha", 1, ["dev-a"])
    with Session(engine) as s, s.begin():
        device = s.get(Device, "dev-a")
        held = s.get(DeviceModel, ("dev-a", "alpha"))
        assert device is not None and held is not None
        alpha1, alpha2 = (
            s.exec(select(Bundle).where(Bundle.name == "alpha", Bundle.version == v)).one() for v in (1, 2)
        )

        inside: list[tuple[int, int | None, int]] = []

        def deploy_then_undo(released_first: bool) -> None:
            """The deploy's own savepoint rolls back, or it is released and an outer one rolls back."""
            with s.begin_nested():
                with s.begin_nested() if released_first else contextlib.nullcontext():
                    deployments.deploy(s, bundle=alpha2, device_ids=["dev-a"])
                inside.append((device.desired_generation, device.desired_bundle_id, held.bundle_id))
                raise RuntimeError("undo")

        for released_first in (False, True):
            with pytest.raises(RuntimeError):
                deploy_then_undo(released_first)
            assert inside.pop() == (2, alpha2.id, alpha2.id)
            assert (device.desired_generation, device.desired_bundle_id, held.bundle_id) == (
                1,
                alpha1.id,
                alpha1.id,
            )

        deployments.deploy(s, bundle=alpha2, device_ids=["dev-a"])
        assert (device.desired_generation, held.bundle_id) == (2, alpha2.id)


def test_a_refused_batch_stores_no_metadata_for_any_device(
    engine: Engine, repositories: Repositories
) -> None:
    enroll(engine, ["dev-a", "dev-b"])
    deploy(engine, repositories, "alpha", 1, ["dev-a", "dev-b"])
    before = {d: director_versions(engine, d) for d in ("dev-a", "dev-b")}
    batches = [
        [Assignment("dev-a", 5, (("alpha", 2),)), Assignment("dev-b", 5, (("gamma", 1),))],
        [
            Assignment("dev-a", 5, (("alpha", 2),)),
            Assignment("dev-b", 5, (("alpha", 2),), config=common_pb2.DeviceConfig(n_ctx=5)),
        ],
    ]
    for batch in batches:
        with pytest.raises(RepositoryRefusal), Session(engine) as s, s.begin():
            repositories.assign_many(s, batch)
    assert {d: director_versions(engine, d) for d in ("dev-a", "dev-b")} == before


def test_a_rollout_wave_is_assigned_in_batches_and_a_refused_batch_one_by_one(
    engine: Engine, repositories: Repositories
) -> None:
    ids = [f"dev-{i}" for i in range(6)]
    enroll(engine, ids)
    enroll(engine, ["dev-bad"], config={"nCtx": 5})  # stored before validation existed, say
    deploy(engine, repositories, "alpha", 1, ids[:3])
    spec = RolloutSpec(
        name="r",
        bundle=common_pb2.BundleRef(name="alpha", version=2),
        config=None,
        selector={},
        waves=[WaveSize(percent=100)],
        soak_seconds=0,
        max_concurrent=0,
        thresholds=Thresholds(),
    )
    with Session(engine, expire_on_commit=False) as s, s.begin():
        rollout = rollout_commands.create(s, spec, actor="t")
    # Batches of 4: dev-0..dev-3 go in one; dev-4, dev-5 and dev-bad are refused together, then
    # tried one by one.
    machine = RolloutMachine(repositories, EngineConfig(assign_batch=4))
    with Session(engine, expire_on_commit=False) as s, s.begin():
        nudged = machine.step(s, rollout_id=rollout.id or 0, now=utcnow())
    assert sorted(nudged) == ids
    with Session(engine) as s:
        alpha1 = s.exec(select(Bundle.id).where(Bundle.name == "alpha", Bundle.version == 1)).one()
        rows = {r.device_id: r for r in s.exec(select(RolloutDevice)).all()}
    assert rows["dev-bad"].state == states.FAILED
    assert "not assigned" in rows["dev-bad"].reason
    for i, device_id in enumerate(ids):
        row = rows[device_id]
        assert (row.state, row.previous_bundle_id) == (states.UPDATING, alpha1 if i < 3 else None)
        check_director(engine, device_id, row.generation, [("alpha", 2)])
