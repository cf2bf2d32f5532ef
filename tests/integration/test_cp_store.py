"""The store's side of several models per device, on SQLite and on a real PostgreSQL:
deploy adds or replaces by bundle name, undeploy removes, pins re-sign the whole set, and a
database made before several models per device is brought up to date."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from alembic import command
from sqlalchemy import MetaData, create_engine, inspect, text
from sqlalchemy.engine import Engine
from sqlmodel import Session, select

from edgefleet.controlplane.store import bundles, deployments, devices, errors, pins
from edgefleet.controlplane.store.engine import make_engine
from edgefleet.controlplane.store.migrate import BASELINE, alembic_config
from edgefleet.controlplane.store.models import Bundle, Deployment, Device, DeviceModel, utcnow
from tests.integration.test_cp_migrations import HEAD, assert_matches_models, revision

pytestmark = pytest.mark.integration


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'controlplane.sqlite3'}"


@pytest.fixture(params=["sqlite", "postgres"])
def url(request: pytest.FixtureRequest) -> str:
    return str(request.getfixturevalue("sqlite_url" if request.param == "sqlite" else "postgres_database"))


@pytest.fixture
def engine(url: str) -> Iterator[Engine]:
    eng = make_engine(url)
    yield eng
    eng.dispose()


def add_bundle(session: Session, name: str, version: int) -> Bundle:
    bundle = Bundle(
        name=name,
        version=version,
        release_metadata=f"{name}@{version}".encode(),
        manifest_json="{}",
        expires_at=utcnow() + timedelta(days=1),
    )
    session.add(bundle)
    session.flush()
    return bundle


def add_device(session: Session, device_id: str, labels: dict[str, str] | None = None) -> None:
    devices.create_device(session, device_id=device_id, hostname="h", labels=labels or {})


def bundle_named(session: Session, name: str, version: int) -> Bundle:
    bundle = bundles.get_bundle(session, name=name, version=version)
    assert bundle is not None
    return bundle


@pytest.fixture
def fleet(engine: Engine) -> Engine:
    """Devices a, b (labelled hw=jetson) and c; bundles alpha@1, alpha@2, beta@1."""
    with Session(engine) as s, s.begin():
        for device_id in "abc":
            add_device(s, device_id, {"hw": "jetson"} if device_id == "b" else {})
        for name, version in [("alpha", 1), ("alpha", 2), ("beta", 1)]:
            add_bundle(s, name, version)
    return engine


def deploy(engine: Engine, name: str, version: int, ids: list[str] | None) -> list[deployments.DeployedTo]:
    with Session(engine, expire_on_commit=False) as s, s.begin():
        return deployments.deploy(s, bundle=bundle_named(s, name, version), device_ids=ids)


def undeploy(engine: Engine, name: str, ids: list[str] | None) -> list[deployments.DeployedTo]:
    with Session(engine, expire_on_commit=False) as s, s.begin():
        return deployments.undeploy(s, name=name, device_ids=ids)


def device(engine: Engine, device_id: str) -> tuple[int, str | None]:
    """(desired generation, desired bundle as name@version or None)."""
    with Session(engine) as s:
        row = s.get(Device, device_id)
        assert row is not None
        desired = s.get(Bundle, row.desired_bundle_id) if row.desired_bundle_id else None
        return row.desired_generation, f"{desired.name}@{desired.version}" if desired else None


def releases(engine: Engine, device_id: str) -> list[tuple[str, int]]:
    with Session(engine) as s:
        return deployments.device_releases(s, device_id)


def test_deploy_adds_or_replaces_by_name(fleet: Engine) -> None:
    assert deploy(fleet, "alpha", 1, ["a", "b"]) == [
        deployments.DeployedTo("a", 1, [("alpha", 1)]),
        deployments.DeployedTo("b", 1, [("alpha", 1)]),
    ]
    assert deploy(fleet, "beta", 1, ["a"]) == [deployments.DeployedTo("a", 2, [("alpha", 1), ("beta", 1)])]
    assert deploy(fleet, "alpha", 2, None) == [
        deployments.DeployedTo("a", 3, [("alpha", 2), ("beta", 1)]),
        deployments.DeployedTo("b", 2, [("alpha", 2)]),
        deployments.DeployedTo("c", 1, [("alpha", 2)]),
    ]
    assert device(fleet, "a") == (3, "alpha@2")
    with Session(fleet) as s:
        assert len(s.exec(select(DeviceModel)).all()) == 4  # a: alpha, beta; b: alpha; c: alpha
        history = s.exec(select(Deployment).where(Deployment.device_id == "a")).all()
        assert sorted(d.generation for d in history) == [1, 2, 3]
        assert deployments.assigned_models(s) == {
            "a": [("alpha", 2), ("beta", 1)],
            "b": [("alpha", 2)],
            "c": [("alpha", 2)],
        }


def test_deploy_to_an_unknown_device_changes_nothing(fleet: Engine) -> None:
    with pytest.raises(errors.DeviceNotFound, match="nope"):
        deploy(fleet, "alpha", 1, ["a", "nope"])
    assert (device(fleet, "a"), releases(fleet, "a")) == ((0, None), [])


def test_undeploy_removes_the_name_and_moves_the_desired_bundle(fleet: Engine) -> None:
    deploy(fleet, "beta", 1, ["a"])
    deploy(fleet, "alpha", 2, ["a", "b"])
    assert device(fleet, "a") == (2, "alpha@2")

    assert undeploy(fleet, "alpha", ["a"]) == [deployments.DeployedTo("a", 3, [("beta", 1)])]
    assert device(fleet, "a") == (3, "beta@1")  # the remaining model
    assert undeploy(fleet, "beta", ["a"]) == [deployments.DeployedTo("a", 4, [])]
    assert device(fleet, "a") == (4, None)
    assert device(fleet, "b") == (1, "alpha@2")  # never named


def test_undeploy_keeps_the_desired_bundle_when_another_name_goes(fleet: Engine) -> None:
    deploy(fleet, "alpha", 1, ["a"])
    deploy(fleet, "beta", 1, ["a"])
    undeploy(fleet, "alpha", ["a"])
    assert device(fleet, "a") == (3, "beta@1")


def test_undeploy_falls_back_to_the_newest_pushed_remaining_model(fleet: Engine) -> None:
    with Session(fleet) as s, s.begin():
        add_bundle(s, "gamma", 1)  # pushed after beta: the higher bundle id
    deploy(fleet, "gamma", 1, ["a"])
    deploy(fleet, "beta", 1, ["a"])
    deploy(fleet, "alpha", 1, ["a"])
    undeploy(fleet, "alpha", ["a"])
    assert device(fleet, "a") == (4, "gamma@1")


def test_undeploy_leaves_devices_without_the_model_alone(fleet: Engine) -> None:
    deploy(fleet, "alpha", 1, ["a"])
    deploy(fleet, "beta", 1, ["b"])
    assert undeploy(fleet, "alpha", ["b", "c"]) == []
    assert undeploy(fleet, "alpha", None) == [deployments.DeployedTo("a", 2, [])]
    assert (device(fleet, "b"), device(fleet, "c")) == ((1, "beta@1"), (0, None))
    assert undeploy(fleet, "alpha", None) == []
    with pytest.raises(errors.DeviceNotFound, match="nope"):
        undeploy(fleet, "beta", ["b", "nope"])
    assert releases(fleet, "b") == [("beta", 1)]


def pin(engine: Engine, *, device_id: str | None = None, **selector: str) -> pins.PinChange:
    with Session(engine, expire_on_commit=False) as s, s.begin():
        return pins.set_pin(
            s, device_id=device_id, selector=selector, variant_id="gguf-q4_0", fmt=0, clear=False, actor="t"
        )


def test_a_pin_change_re_signs_every_model_and_skips_devices_without_any(fleet: Engine) -> None:
    deploy(fleet, "alpha", 1, ["b"])
    deploy(fleet, "beta", 1, ["b"])
    deploy(fleet, "alpha", 1, ["a"])
    undeploy(fleet, "alpha", ["a"])  # a: generation 2, no models left

    by_label = pin(fleet, hw="jetson")
    assert [(m.device_id, m.generation, m.releases) for m in by_label.repinned] == [
        ("b", 3, [("alpha", 1), ("beta", 1)])
    ]
    on_a = pin(fleet, device_id="a")
    assert (on_a.changed, on_a.repinned) == (True, [])
    assert device(fleet, "a") == (2, None)


def test_reported_models_round_trip(fleet: Engine) -> None:
    reported = [{"name": "alpha", "version": 1, "variant": "gguf-q4_0", "loaded": True}]
    with Session(fleet) as s, s.begin():
        row = s.get(Device, "a")
        assert row is not None and row.models == []
        row.models = reported
        s.add(row)
    with Session(fleet) as s:
        row = s.get(Device, "a")
        assert row is not None and row.models == reported


def make_baseline_database(url: str, *, versioned: bool) -> None:
    """A database as a release before several models per device left it: the baseline tables
    (the text its create_all wrote), alembic_version only when ``versioned``, a device "old"
    whose one model is its desired bundle alpha@1 (deployed: a row that points at the device,
    which SQLite's copy of the device table must keep valid), and a device "new" without one."""
    plain = create_engine(url)
    try:
        with plain.begin() as conn:
            command.upgrade(alembic_config(conn), BASELINE)
            if not versioned:
                conn.execute(text("DROP TABLE alembic_version"))
            tables = MetaData()
            tables.reflect(conn)
            bundle, device, deployment = (tables.tables[t] for t in ("bundle", "device", "deployment"))
            now = utcnow()
            alpha = conn.execute(
                bundle.insert()
                .values(
                    name="alpha",
                    version=1,
                    release_metadata=b"alpha@1",
                    manifest_json="{}",
                    created_at=now,
                    expires_at=now + timedelta(days=1),
                    total_bytes=0,
                )
                .returning(bundle.c.id)
            ).scalar_one()
            row = {
                "enrollment_sha256": "",
                "hostname": "h",
                "labels": {},
                "enrolled_at": now,
                "state": 0,
                "active_bundle": "",
                "active_version": 0,
                "variant": "",
                "api_url": "",
                "last_error": "",
                "applied_generation": 0,
                "last_tokens_per_second": 0.0,
                "last_latency_ms": 0.0,
                "requests_total": 0,
                "selection_reason": "",
            }
            conn.execute(
                device.insert(),
                [
                    {**row, "id": "old", "desired_bundle_id": alpha, "desired_generation": 1},
                    {**row, "id": "new", "desired_bundle_id": None, "desired_generation": 0},
                ],
            )
            conn.execute(
                deployment.insert().values(device_id="old", bundle_id=alpha, generation=1, created_at=now)
            )
    finally:
        plain.dispose()


@pytest.mark.parametrize("versioned", [True, False], ids=["by-alembic", "by-create-all"])
def test_a_database_from_before_several_models_is_upgraded(url: str, versioned: bool) -> None:
    """No devicemodel table, no device.models column, and a device whose one model is its
    desired bundle; left at the baseline by Alembic, or made by create_all (no alembic_version:
    recognised as the baseline). Opening it keeps that model assigned."""
    make_baseline_database(url, versioned=versioned)

    upgraded = make_engine(url)
    try:
        assert revision(upgraded) == HEAD
        assert "models" in {c["name"] for c in inspect(upgraded).get_columns("device")}
        assert (releases(upgraded, "old"), releases(upgraded, "new")) == ([("alpha", 1)], [])
        with Session(upgraded) as s:
            row = s.get(Device, "old")
            assert row is not None and row.models == []
        assert_matches_models(upgraded)
        make_engine(url).dispose()  # a second start changes nothing
        assert releases(upgraded, "old") == [("alpha", 1)]
    finally:
        upgraded.dispose()
