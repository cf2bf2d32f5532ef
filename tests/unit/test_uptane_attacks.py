"""The attack suite: one test per attack on the Uptane trust layer, each refused with its own
typed error, plus the legitimate changes (key rotation, deliberate rollback) that must pass.

The control plane's real repository code signs into a real SQLite store; the device's real
verifier (python-tuf ngclient) reads it through an in-process transport that an attacker
controls (it may substitute any file).
"""

from __future__ import annotations

import hashlib
import json
import urllib.parse
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy.engine import Engine
from sqlmodel import Session
from tuf.api import exceptions as tuf_errors
from tuf.api.metadata import Metadata, MetaFile, Snapshot, TargetFile, Targets, Timestamp
from tuf.api.serialization.json import JSONSerializer
from tuf.ngclient import FetcherInterface

from edgefleet.agent.update.artifacts import ArtifactStore
from edgefleet.agent.update.updater import UnusableConfig, signed_config
from edgefleet.agent.update.uptane_client import UptaneVerifier
from edgefleet.controlplane.build.bundles import BundleOnDisk
from edgefleet.controlplane.cli.client import extend_image_targets
from edgefleet.controlplane.store.engine import make_engine
from edgefleet.controlplane.trust.keys import KeyDir, init_keys
from edgefleet.controlplane.trust.repositories import Expiry, Repositories, RepositoryRefusal
from edgefleet.protos.fleet import release as rel
from edgefleet.protos.fleet import uptane
from edgefleet.protos.fleet.uptane import DIRECTOR, IMAGE
from edgefleet.protos.fleet.v1 import bundle_pb2, common_pb2, device_pb2

DEVICE = "dev-aaaaaaaaaaaa"


@dataclass
class AttackerTransport(FetcherInterface):
    """Serves the control plane's files unless the attacker substituted one."""

    engine: Engine
    repos: Repositories
    device_id: str = DEVICE
    substitute: dict[tuple[str, str], bytes] = field(default_factory=dict)

    def _fetch(self, url: str) -> Iterator[bytes]:
        parsed = urllib.parse.urlsplit(url)
        repo, name = parsed.netloc, parsed.path.lstrip("/")
        if (repo, name) in self.substitute:
            return iter([self.substitute[(repo, name)]])
        with Session(self.engine) as session:
            data = self.repos.lookup(session, repo=repo, device_id=self.device_id, name=name)
        if data is None:
            raise tuf_errors.DownloadHTTPError(f"{url} not found", 404)
        return iter([data])


@dataclass
class World:
    keys: KeyDir
    engine: Engine
    repos: Repositories
    transport: AttackerTransport
    tmp: Path

    def publish(
        self,
        version: int,
        payload: bytes,
        *,
        signers: list | None = None,  # type: ignore[type-arg]
        name: str = "tiny",
    ) -> rel.VerifiedRelease:
        release = fake_release(version, payload, name=name)
        with Session(self.engine) as s, s.begin():
            current = self.repos.image_targets(s)
            data = extend_image_targets(
                current, BundleOnDisk(self.tmp, release), signers or self.keys.release_signers()
            )
            self.repos.publish_image_targets(s, data, release=release)
        return release

    def deploy(
        self,
        version: int,
        generation: int,
        device_id: str = DEVICE,
        *,
        also: tuple[tuple[str, int], ...] = (),
    ) -> None:
        with Session(self.engine) as s, s.begin():
            releases = [("tiny", version), *also]
            self.repos.assign(s, device_id=device_id, generation=generation, releases=releases)

    def verifier(self, name: str = "device") -> UptaneVerifier:
        return UptaneVerifier(
            tuf_dir=self.tmp / name,
            anchors=self.keys.trust_anchors(),
            fetcher=self.transport,
            device_id=DEVICE,
        )

    def stored(self, repo: str, name: str, device_id: str = DEVICE) -> bytes:
        with Session(self.engine) as s:
            data = self.repos.lookup(s, repo=repo, device_id=device_id, name=name)
        assert data is not None
        return data


def fake_release(version: int, payload: bytes, *, name: str = "tiny") -> rel.VerifiedRelease:
    artifact = "model.q4_0.gguf"
    info = rel.ArtifactInfo(artifact, len(payload), hashlib.sha256(payload).hexdigest())
    variant = bundle_pb2.Variant(
        id="gguf-q4_0",
        format=common_pb2.MODEL_FORMAT_GGUF,
        quantization="Q4_0",
        artifact=artifact,
        size_bytes=len(payload),
    )
    manifest = bundle_pb2.BundleManifest(schema_version=1, name=name, version=version, variants=[variant])
    return rel.VerifiedRelease(name, version, datetime.now(UTC), manifest, {artifact: info}, b"")


@pytest.fixture
def world(tmp_path: Path) -> World:
    keys = init_keys(tmp_path / "keys")
    engine = make_engine(f"sqlite:///{tmp_path / 'cp.db'}")
    repos = Repositories(keys)
    with Session(engine) as s, s.begin():
        repos.bootstrap(s)
    w = World(keys, engine, repos, AttackerTransport(engine, repos), tmp_path)
    w.publish(1, b"one" * 100)
    w.deploy(1, generation=1)
    return w


def sign(signed: Targets | Snapshot | Timestamp, signers: list) -> bytes:  # type: ignore[type-arg]
    md = Metadata(signed)
    for s in signers:
        md.sign(s, append=True)
    return md.to_bytes(JSONSerializer())


def director_targets(world: World, **custom: object) -> Targets:
    release = world.publish(2, b"two" * 100) if "path" not in custom else None
    path = str(custom.pop("path", uptane.image_target_path("tiny", 2, "model.q4_0.gguf")))
    info = release.artifacts["model.q4_0.gguf"] if release else rel.ArtifactInfo(path, 3, "0" * 64)
    fields = uptane.director_fields(str(custom.get("device", DEVICE)), 2, [("tiny", 2)])
    length = int(custom.get("length", info.length))  # type: ignore[call-overload]
    return Targets(
        version=2,
        expires=datetime.now(UTC) + timedelta(days=1),
        targets={path: TargetFile(length, {"sha256": info.sha256}, path)},
        unrecognized_fields=fields,
    )


def substitute_director(world: World, targets: Targets) -> None:
    """A compromised director: the attacker holds the online director key and re-signs."""
    online = world.keys.signers(DIRECTOR, "targets")
    snapshot = Snapshot(
        version=2,
        expires=datetime.now(UTC) + timedelta(days=1),
        meta={"targets.json": MetaFile(version=targets.version)},
    )
    timestamp = Timestamp(
        version=2, expires=datetime.now(UTC) + timedelta(days=1), snapshot_meta=MetaFile(version=2)
    )
    world.transport.substitute[(DIRECTOR, "targets.json")] = sign(targets, online)
    world.transport.substitute[(DIRECTOR, "snapshot.json")] = sign(snapshot, online)
    world.transport.substitute[(DIRECTOR, "timestamp.json")] = sign(timestamp, online)


# -- the happy path ----------------------------------------------------------------------------


def test_both_repositories_agree(world: World) -> None:
    assignment = world.verifier().refresh()
    assert assignment is not None
    ((release,),) = [assignment.releases]
    assert (assignment.generation, release.name, release.version) == (1, "tiny", 1)


def test_several_models_are_verified_each_against_its_own_release(world: World) -> None:
    world.publish(1, b"embedder" * 50, name="embed")
    world.deploy(1, generation=2, also=(("embed", 1),))
    assignment = world.verifier().refresh()
    assert [(r.name, r.version) for r in assignment.releases] == [("embed", 1), ("tiny", 1)]
    embed = assignment.releases[0]
    assert (
        [v.artifact for v in embed.manifest.variants]
        == list(embed.artifacts)
        == [uptane.image_target_path("embed", 1, "model.q4_0.gguf")]
    )
    world.deploy(1, generation=3, also=())
    assert [r.name for r in world.verifier().refresh().releases] == ["tiny"]


def test_director_listing_a_target_of_an_unassigned_release_is_refused(world: World) -> None:
    """A compromised director slips another bundle's artifact in beside the assigned one."""
    info = world.publish(1, b"embedder" * 50, name="embed").artifacts["model.q4_0.gguf"]
    path = uptane.image_target_path("embed", 1, "model.q4_0.gguf")
    targets = Targets(
        version=2,
        expires=datetime.now(UTC) + timedelta(days=1),
        targets={path: TargetFile(info.length, {"sha256": info.sha256}, path)},
        unrecognized_fields=uptane.director_fields(DEVICE, 2, [("tiny", 1)]),
    )
    substitute_director(world, targets)
    with pytest.raises(rel.DirectorImageMismatch, match="belongs to embed@1, the director assigns tiny@1"):
        world.verifier().refresh()


# -- attacks -----------------------------------------------------------------------------------


def test_arbitrary_bundle_named_by_a_compromised_director(world: World) -> None:
    substitute_director(world, director_targets(world, path="tiny/9/evil.gguf"))
    with pytest.raises(rel.UnknownTarget):
        world.verifier().refresh()


def test_image_targets_signed_with_a_wrong_key(world: World) -> None:
    data = json.loads(world.stored(IMAGE, "targets.json"))
    forged = Metadata.from_dict(data)
    forged.signatures.clear()
    for s in world.keys.signers(IMAGE, "timestamp"):  # a real key, but not a release key
        forged.sign(s, append=True)
    world.transport.substitute[(IMAGE, "targets.json")] = forged.to_bytes(JSONSerializer())
    with pytest.raises(rel.UntrustedMetadata):
        world.verifier().refresh()


def test_under_threshold_release_signatures(world: World) -> None:
    world.keys.add_key(IMAGE, "targets")
    world.keys.set_threshold(IMAGE, "targets", 2)
    with Session(world.engine) as s, s.begin():
        world.repos.bootstrap(s)  # the control plane learns the new roots
    # One release key signs; the root now wants two.
    release = fake_release(2, b"two" * 100)
    with Session(world.engine) as s:
        current = world.repos.image_targets(s)
    one_key = world.keys.release_signers()[:1]
    world.transport.substitute[(IMAGE, "targets.json")] = extend_image_targets(
        current, BundleOnDisk(world.tmp, release), one_key
    )
    with pytest.raises(rel.UntrustedMetadata):
        world.verifier().refresh()


def test_expired_timestamp_is_a_freeze_attack(world: World) -> None:
    stale = Timestamp(
        version=9, expires=datetime.now(UTC) - timedelta(seconds=1), snapshot_meta=MetaFile(version=1)
    )
    world.transport.substitute[(IMAGE, "timestamp.json")] = sign(
        stale, world.keys.signers(IMAGE, "timestamp")
    )
    with pytest.raises(rel.ExpiredMetadata):
        world.verifier().refresh()


def test_replayed_image_metadata(world: World) -> None:
    old_timestamp = world.stored(IMAGE, "timestamp.json")
    world.publish(2, b"two" * 100)
    device = world.verifier()
    device.refresh()  # the device has now seen the newer image timestamp
    world.transport.substitute[(IMAGE, "timestamp.json")] = old_timestamp
    with pytest.raises(rel.ReplayedMetadata):
        world.verifier().refresh()


def test_replayed_director_metadata(world: World) -> None:
    old_timestamp = world.stored(DIRECTOR, "timestamp.json")
    world.publish(2, b"two" * 100)
    world.deploy(2, generation=2)
    assert world.verifier().refresh().generation == 2  # type: ignore[union-attr]
    world.transport.substitute[(DIRECTOR, "timestamp.json")] = old_timestamp
    with pytest.raises(rel.ReplayedMetadata):
        world.verifier().refresh()


def test_mix_and_match(world: World) -> None:
    substitute_director(world, director_targets(world, length=301))
    with pytest.raises(rel.DirectorImageMismatch):
        world.verifier().refresh()


def test_target_for_another_device(world: World) -> None:
    substitute_director(world, director_targets(world, device="dev-bbbbbbbbbbbb"))
    with pytest.raises(rel.TargetForAnotherDevice):
        world.verifier().refresh()


def test_endless_metadata(world: World) -> None:
    world.transport.substitute[(IMAGE, "timestamp.json")] = b"{" + b" " * 20_000_000
    with pytest.raises(rel.MetadataTooLong):
        world.verifier().refresh()


def test_path_traversal_in_a_target(world: World) -> None:
    substitute_director(world, director_targets(world, path="tiny/2/../../../etc/passwd"))
    with pytest.raises(rel.UnsafeTargetPath):
        world.verifier().refresh()


def test_key_rotation_is_followed_and_the_revoked_key_refused(world: World) -> None:
    device = world.verifier()
    device.refresh()
    old_release_keys = world.keys.release_signers()
    world.keys.rotate(IMAGE, "targets")
    with Session(world.engine) as s, s.begin():
        world.repos.bootstrap(s)
    world.publish(2, b"two" * 100)  # signed with the new release key
    world.deploy(2, generation=2)
    assignment = world.verifier().refresh()
    assert assignment is not None and assignment.releases[0].version == 2
    assert (world.tmp / "device" / IMAGE / "root_history" / "2.root.json").exists()

    # The revoked key signs a newer image targets: refused, though it was trusted before.
    with Session(world.engine) as s:
        current = world.repos.image_targets(s)
    forged = extend_image_targets(
        current, BundleOnDisk(world.tmp, fake_release(3, b"three")), old_release_keys
    )
    world.transport.substitute[(IMAGE, "targets.json")] = forged
    world.transport.substitute[(IMAGE, "snapshot.json")] = sign(
        Snapshot(
            version=99,
            expires=datetime.now(UTC) + timedelta(days=1),
            meta={"targets.json": MetaFile(version=Metadata.from_bytes(forged).signed.version)},
        ),
        world.keys.signers(IMAGE, "snapshot"),
    )
    world.transport.substitute[(IMAGE, "timestamp.json")] = sign(
        Timestamp(
            version=99, expires=datetime.now(UTC) + timedelta(days=1), snapshot_meta=MetaFile(version=99)
        ),
        world.keys.signers(IMAGE, "timestamp"),
    )
    with pytest.raises(rel.UntrustedMetadata):
        world.verifier().refresh()


def test_root_key_rotation_is_followed(world: World) -> None:
    world.verifier().refresh()
    world.keys.rotate(IMAGE, "root")
    world.keys.rotate(DIRECTOR, "root")
    with Session(world.engine) as s, s.begin():
        world.repos.bootstrap(s)
    world.deploy(1, generation=2)
    assert world.verifier().refresh().generation == 2  # type: ignore[union-attr]


def test_deliberate_operator_rollback_is_accepted(world: World) -> None:
    world.publish(2, b"two" * 100)
    world.deploy(2, generation=2)
    assert world.verifier().refresh().releases[0].version == 2  # type: ignore[union-attr]
    world.deploy(1, generation=3)  # new director metadata pointing at the older release
    assignment = world.verifier().refresh()
    assert assignment is not None
    assert (assignment.generation, assignment.releases[0].version) == (3, 1)


def test_control_plane_refuses_image_targets_that_drop_a_release(world: World) -> None:
    release = fake_release(2, b"two" * 100)
    targets = extend_image_targets(None, BundleOnDisk(world.tmp, release), world.keys.release_signers())
    with Session(world.engine) as s, s.begin(), pytest.raises(RepositoryRefusal, match="version"):
        world.repos.publish_image_targets(s, targets, release=release)


# -- artifact bytes ----------------------------------------------------------------------------


class HostileArtifactServer:
    """Stands in for DeviceService.FetchArtifact (unit test transport) and serves given bytes."""

    def __init__(self, payload: bytes) -> None:
        self.payload = payload
        self.offsets: list[int] = []

    def FetchArtifact(self, request: object, metadata: object = None) -> AsyncIterator[object]:
        offset = int(request.offset)  # type: ignore[attr-defined]
        self.offsets.append(offset)
        payload = self.payload

        async def chunks() -> AsyncIterator[object]:
            for start in range(offset, len(payload), 1000):
                yield device_pb2.ArtifactChunk(offset=start, data=payload[start : start + 1000])

        return chunks()


def artifact(payload: bytes) -> rel.ArtifactInfo:
    return rel.ArtifactInfo("a", len(payload), hashlib.sha256(payload).hexdigest())


async def test_endless_artifact_data_stops_at_the_signed_length(tmp_path: Path) -> None:
    good = b"x" * 5000
    server = HostileArtifactServer(good + b"y" * 100_000)
    store = ArtifactStore(tmp_path / "artifacts", tmp_path / "downloads")
    with pytest.raises(rel.ArtifactTooLong):
        await store.fetch(server, artifact(good))  # type: ignore[arg-type]
    assert not store.has(artifact(good).sha256)
    assert store.part_path(artifact(good).sha256).stat().st_size == len(good)


async def test_wrong_artifact_hash_is_refused_and_discarded(tmp_path: Path) -> None:
    server = HostileArtifactServer(b"z" * 5000)
    store = ArtifactStore(tmp_path / "artifacts", tmp_path / "downloads")
    info = artifact(b"x" * 5000)
    with pytest.raises(rel.ArtifactHashMismatch):
        await store.fetch(server, info)  # type: ignore[arg-type]
    assert not store.has(info.sha256)
    assert not store.part_path(info.sha256).exists()


async def test_symlink_planted_at_the_download_path_is_not_followed(tmp_path: Path) -> None:
    payload = b"x" * 5000
    info = artifact(payload)
    store = ArtifactStore(tmp_path / "artifacts", tmp_path / "downloads")
    store.download_dir.mkdir(parents=True)
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    store.part_path(info.sha256).symlink_to(victim)
    path = await store.fetch(HostileArtifactServer(payload), info)  # type: ignore[arg-type]
    assert path.read_bytes() == payload
    assert victim.read_bytes() == b"precious"


def test_control_plane_re_signs_timestamps_before_they_expire(world: World) -> None:
    world.repos.expiry = Expiry(image_timestamp=timedelta(days=10), director_timestamp=timedelta(days=10))
    with Session(world.engine) as s, s.begin():
        # Stored timestamps were signed for one day: under half of ten, so both get re-signed.
        assert world.repos.refresh_expiring(s) == 2
    with Session(world.engine) as s, s.begin():
        assert world.repos.refresh_expiring(s) == 0
    assert world.verifier().refresh() is not None


# -- device config -----------------------------------------------------------------------------


def assign_config(world: World, generation: int, config: common_pb2.DeviceConfig) -> None:
    with Session(world.engine) as s, s.begin():
        world.repos.assign(s, device_id=DEVICE, generation=generation, releases=[("tiny", 1)], config=config)


def test_a_signed_device_config_reaches_the_device(world: World) -> None:
    config = common_pb2.DeviceConfig(
        n_ctx=4096, max_waiting=0, keep_alive_seconds=0, telemetry_interval_seconds=2.5
    )
    assign_config(world, 2, config)
    assignment = world.verifier().refresh()
    assert assignment.generation == 2 and assignment.config == config
    assert signed_config(assignment) == config
    world.deploy(1, generation=3)  # a deployment without one: the device has none
    assert world.verifier().refresh().config is None


def test_control_plane_refuses_an_invalid_config_before_signing(world: World) -> None:
    before = world.stored(DIRECTOR, "timestamp.json")
    with pytest.raises(
        RepositoryRefusal, match=r"device config of dev-a+ refused: n_ctx: must be 128\.\.1048576"
    ):
        assign_config(world, 2, common_pb2.DeviceConfig(n_ctx=16))
    assert world.stored(DIRECTOR, "timestamp.json") == before  # nothing signed
    assert world.verifier().refresh().generation == 1


def test_compromised_director_pushing_an_invalid_config_is_refused_by_the_agent(world: World) -> None:
    """The attacker holds the online director key, so the signature checks out; the agent
    applies the control plane's rules again and refuses the config (the updater reports FAILED
    with this reason and keeps its settings: tests/unit/test_device_config_agent.py)."""
    targets = director_targets(world)
    targets.unrecognized_fields[uptane.CUSTOM_KEY]["config"] = {"maxRunning": 100000, "nCtx": 4096}
    substitute_director(world, targets)
    assignment = world.verifier().refresh()
    assert assignment.config == common_pb2.DeviceConfig(max_running=100000, n_ctx=4096)
    with pytest.raises(
        UnusableConfig, match=r"device config refused: max_running: must be 1\.\.64, got 100000"
    ):
        signed_config(assignment)


@pytest.mark.parametrize(
    "bad", ["nCtx=4096", {"nCtx": "4096 tokens"}, {"nCtx": -1}, {"sshKey": "ssh-ed25519"}]
)
def test_compromised_director_pushing_a_malformed_config_is_refused_by_the_verifier(
    world: World, bad: object
) -> None:
    targets = director_targets(world)
    targets.unrecognized_fields[uptane.CUSTOM_KEY]["config"] = bad
    substitute_director(world, targets)
    with pytest.raises(rel.MalformedMetadata, match="malformed 'edgefleet' field"):
        world.verifier().refresh()


def test_a_config_edited_in_transit_is_refused(world: World) -> None:
    """Without the director key: the signed bytes change, the signature no longer matches."""
    assign_config(world, 2, common_pb2.DeviceConfig(n_ctx=1024))
    document = json.loads(world.stored(DIRECTOR, "targets.json"))
    document["signed"][uptane.CUSTOM_KEY]["config"] = {"nCtx": 1048576}
    world.transport.substitute[(DIRECTOR, "targets.json")] = json.dumps(document).encode()
    with pytest.raises(rel.UntrustedMetadata):
        world.verifier().refresh()
