"""The control plane's two TUF repositories, Uptane style.

Image repository: ``targets`` arrives signed by the release keys (``fleetctl bundle push``);
the control plane only checks it and signs ``snapshot``/``timestamp`` with its online key.
Director repository: per device, the control plane signs ``targets`` (which release this
device runs, with its id, deployment generation, any operator pin of a variant or runtime and
any device config), ``snapshot`` and ``timestamp`` online.
Every version is stored; devices fetch them through ``DeviceService.FetchMetadata`` by the
file names python-tuf's updater asks for.

Several control-plane replicas share the repositories. Every change to one repository's
metadata (the image repository, or one device's director metadata) reads the latest versions,
signs the next ones and stores them under a PostgreSQL advisory lock on that repository, held
to the end of the transaction (``lock_repository``): two replicas never allocate the same
version, the second one waits and then reads what the first committed. SQLite has one writer
at a time anyway.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from google.protobuf import json_format
from securesystemslib.signer import Signer
from sqlalchemy import text
from sqlmodel import Session, col, select
from tuf.api.exceptions import UnsignedMetadataError
from tuf.api.metadata import Metadata, MetaFile, Root, Signed, Snapshot, TargetFile, Targets, Timestamp

from edgefleet.controlplane.store.models import TufMetadata
from edgefleet.controlplane.store.values import as_utc
from edgefleet.controlplane.trust.director_rows import (
    REPOSITORY_LOCK_NAMESPACE,
    Assignment,
    latest_versions,
    lock_repositories,
    serialize,
    store_many,
)
from edgefleet.controlplane.trust.keys import KeyDir
from edgefleet.protos.fleet import uptane
from edgefleet.protos.fleet.device_config import InvalidConfig, config_to_json, is_empty, validate_config
from edgefleet.protos.fleet.release import VerifiedRelease
from edgefleet.protos.fleet.uptane import DIRECTOR, IMAGE
from edgefleet.protos.fleet.v1 import common_pb2

IMAGE_DEVICE = ""  # the image repository is shared by every device
METADATA_NAME = re.compile(
    r"^(?:(?P<version>[1-9][0-9]*)\.)?(?P<role>root|timestamp|snapshot|targets)\.json$"
)


def lock_repository(session: Session, repo: str, device_id: str) -> None:
    """Holds the repository's advisory lock until the transaction ends (PostgreSQL), so the
    versions it reads next are the latest committed and the ones it stores are its own."""
    bind = session.get_bind()
    if bind.dialect.name != "postgresql":
        return
    session.execute(
        text("SELECT pg_advisory_xact_lock(:namespace, hashtext(:name))"),
        {"namespace": REPOSITORY_LOCK_NAMESPACE, "name": f"{repo}/{device_id}"},
    )


class RepositoryRefusal(Exception):
    """Metadata an operator sent was refused; the message says why."""


@dataclass(frozen=True, slots=True)
class Expiry:
    """How long online-signed metadata stays valid; it is re-signed at half its lifetime."""

    image_snapshot: timedelta = timedelta(days=7)
    image_timestamp: timedelta = timedelta(days=1)
    director_targets: timedelta = timedelta(days=30)
    director_snapshot: timedelta = timedelta(days=7)
    director_timestamp: timedelta = timedelta(days=1)


def director_fields(
    device_id: str,
    generation: int,
    releases: Sequence[tuple[str, int]],
    pin: common_pb2.VariantPin | None,
    config: common_pb2.DeviceConfig | None = None,
) -> dict[str, Any]:
    """The signed custom part of director targets: the shared Uptane fields, plus the pin and
    the device config (each only when it says something, so older agents see what they knew)."""
    fields = uptane.director_fields(device_id, generation, releases)
    if pin is not None and (pin.variant_id or pin.format):
        fields[uptane.CUSTOM_KEY]["pin"] = json_format.MessageToDict(pin)
    if not is_empty(config):
        assert config is not None
        fields[uptane.CUSTOM_KEY]["config"] = config_to_json(config)
    return fields


_DIRECTOR_ROLES = ("targets", "snapshot", "timestamp")


@dataclass
class Repositories:
    keys: KeyDir
    expiry: Expiry = field(default_factory=Expiry)

    # -- storage -------------------------------------------------------------------------

    @staticmethod
    def _latest(session: Session, repo: str, device_id: str, role: str) -> TufMetadata | None:
        return session.exec(
            select(TufMetadata)
            .where(
                TufMetadata.repository == repo, TufMetadata.device_id == device_id, TufMetadata.role == role
            )
            .order_by(col(TufMetadata.version).desc())
            .limit(1)
        ).first()

    @staticmethod
    def _store(session: Session, repo: str, device_id: str, metadata: Metadata[Any]) -> bytes:
        data = serialize(metadata)
        session.add(
            TufMetadata(
                repository=repo,
                device_id=device_id,
                role=metadata.signed.type,
                version=metadata.signed.version,
                data=data,
                expires_at=metadata.signed.expires,
            )
        )
        session.flush()
        return data

    def _sign(self, repo: str, signed: Signed, role: str, session: Session) -> Metadata[Any]:
        metadata: Metadata[Any] = Metadata(signed)
        for signer in self._signers(session, repo, role):
            metadata.sign(signer, append=True)
        return metadata

    def _signers(self, session: Session, repo: str, role: str) -> list[Signer]:
        return list(self.keys.signers(repo, role, root=self.root(session, repo)))

    def root(self, session: Session, repo: str) -> Root:
        row = self._latest(session, repo, IMAGE_DEVICE, "root")
        if row is None:
            raise RepositoryRefusal(f"the {repo} repository has no root yet")
        return Metadata[Root].from_bytes(row.data).signed

    # -- bootstrap and roots -------------------------------------------------------------

    def bootstrap(self, session: Session) -> None:
        """Stores the roots from the key directory that the database does not have yet."""
        for repo in (IMAGE, DIRECTOR):
            lock_repository(session, repo, IMAGE_DEVICE)
            latest = self._latest(session, repo, IMAGE_DEVICE, "root")
            known = latest.version if latest else 0
            for data in self.keys.root_history(repo):
                metadata = Metadata[Root].from_bytes(data)
                if metadata.signed.version > known:
                    self.push_root(session, repo, data)

    def push_root(self, session: Session, repo: str, data: bytes) -> int:
        """Accepts root N+1 only if root N's threshold and its own signed it."""
        try:
            new = Metadata[Root].from_bytes(data)
        except Exception as exc:
            raise RepositoryRefusal(f"not root metadata: {exc}") from exc
        if not isinstance(new.signed, Root):
            raise RepositoryRefusal("not root metadata")
        lock_repository(session, repo, IMAGE_DEVICE)
        stored = session.get(TufMetadata, (repo, IMAGE_DEVICE, "root", new.signed.version))
        if stored is not None and stored.data == serialize(new):
            return new.signed.version  # publishing the same root twice is harmless
        latest = self._latest(session, repo, IMAGE_DEVICE, "root")
        expected = latest.version + 1 if latest else 1
        if new.signed.version != expected:
            raise RepositoryRefusal(f"{repo} root version must be {expected}, got {new.signed.version}")
        try:
            if latest is not None:
                Metadata[Root].from_bytes(latest.data).signed.verify_delegate(
                    "root", new.signed_bytes, new.signatures
                )
            new.signed.verify_delegate("root", new.signed_bytes, new.signatures)
        except UnsignedMetadataError as exc:
            raise RepositoryRefusal(
                f"{repo} root {new.signed.version} is not properly signed: {exc}"
            ) from exc
        self._store(session, repo, IMAGE_DEVICE, new)
        if latest is not None:
            # Online keys may have changed: re-sign what devices read next with the new ones.
            if repo == IMAGE and self._latest(session, IMAGE, IMAGE_DEVICE, "targets") is not None:
                self._sign_image_snapshot(session)
            if repo == DIRECTOR:
                for device_id in self._director_devices(session):
                    self._resign_director(session, device_id)
        return new.signed.version

    # -- image repository ----------------------------------------------------------------

    def image_targets(self, session: Session) -> bytes | None:
        row = self._latest(session, IMAGE, IMAGE_DEVICE, "targets")
        return row.data if row else None

    def publish_image_targets(self, session: Session, data: bytes, *, release: VerifiedRelease | None) -> int:
        """Checks new image targets (release-key signature, version, nothing lost, the release
        present as pushed when there is one), stores them and signs snapshot and timestamp."""
        try:
            new = Metadata[Targets].from_bytes(data)
        except Exception as exc:
            raise RepositoryRefusal(f"image targets are not TUF targets metadata: {exc}") from exc
        lock_repository(session, IMAGE, IMAGE_DEVICE)
        try:
            self.root(session, IMAGE).verify_delegate("targets", new.signed_bytes, new.signatures)
        except UnsignedMetadataError as exc:
            raise RepositoryRefusal(f"image targets are not signed by the release keys: {exc}") from exc
        if new.signed.is_expired():
            raise RepositoryRefusal("image targets are already expired")
        current_row = self._latest(session, IMAGE, IMAGE_DEVICE, "targets")
        if current_row is not None:
            current = Metadata[Targets].from_bytes(current_row.data).signed
            if new.signed.version <= current.version:
                raise RepositoryRefusal(
                    f"image targets version {new.signed.version} is not above the current {current.version}; "
                    "another release was pushed meanwhile: push again"
                )
            for path, existing in current.targets.items():
                if new.signed.targets.get(path) != existing:
                    raise RepositoryRefusal(f"image targets drop or change the existing target {path!r}")
        if release is not None:
            self._check_release_listed(new.signed, release)
        if release is None and current_row is not None and set(new.signed.targets) != set(current.targets):
            raise RepositoryRefusal("re-signed image targets must list exactly the existing targets")
        self._store(session, IMAGE, IMAGE_DEVICE, new)
        self._sign_image_snapshot(session)
        return new.signed.version

    @staticmethod
    def _check_release_listed(targets: Targets, release: VerifiedRelease) -> None:
        for artifact, info in release.artifacts.items():
            path = uptane.image_target_path(release.name, release.version, artifact)
            target = targets.targets.get(path)
            if target is None:
                raise RepositoryRefusal(f"image targets lack {path!r}")
            parsed = uptane.parse_image_target(path, target)
            same_bytes = (parsed.info.length, parsed.info.sha256) == (info.length, info.sha256)
            if not same_bytes or (parsed.bundle, parsed.version) != (release.name, release.version):
                raise RepositoryRefusal(f"image target {path!r} differs from the release it carries")
            if parsed.adapter_base != release.adapter_base:
                raise RepositoryRefusal(f"image target {path!r} names another base than its release")
            # A target may omit the release's chunk list (its devices fetch it whole), not change it.
            if None not in (parsed.info.chunks, info.chunks) and parsed.info.chunks != info.chunks:
                raise RepositoryRefusal(f"image target {path!r} signs another chunk list than its release")

    def _next_version(self, session: Session, repo: str, device_id: str, role: str) -> int:
        row = self._latest(session, repo, device_id, role)
        return row.version + 1 if row else 1

    def _sign_snapshot_and_timestamp(
        self,
        session: Session,
        repo: str,
        device_id: str,
        targets_version: int,
        snap: timedelta,
        ts: timedelta,
    ) -> None:
        now = datetime.now(UTC)
        snapshot = Snapshot(
            version=self._next_version(session, repo, device_id, "snapshot"),
            expires=now + snap,
            meta={"targets.json": MetaFile(version=targets_version)},
        )
        self._store(session, repo, device_id, self._sign(repo, snapshot, "snapshot", session))
        timestamp = Timestamp(
            version=self._next_version(session, repo, device_id, "timestamp"),
            expires=now + ts,
            snapshot_meta=MetaFile(version=snapshot.version),
        )
        self._store(session, repo, device_id, self._sign(repo, timestamp, "timestamp", session))

    def _sign_image_snapshot(self, session: Session) -> None:
        lock_repository(session, IMAGE, IMAGE_DEVICE)
        targets = self._latest(session, IMAGE, IMAGE_DEVICE, "targets")
        assert targets is not None
        self._sign_snapshot_and_timestamp(
            session,
            IMAGE,
            IMAGE_DEVICE,
            targets.version,
            self.expiry.image_snapshot,
            self.expiry.image_timestamp,
        )

    # -- director repository -------------------------------------------------------------

    def assign(
        self,
        session: Session,
        *,
        device_id: str,
        generation: int,
        releases: Sequence[tuple[str, int]],
        pin: common_pb2.VariantPin | None = None,
        config: common_pb2.DeviceConfig | None = None,
    ) -> None:
        """Signs new director metadata telling ``device_id`` to hold exactly ``releases``
        (``(bundle, version)`` pairs, one per bundle name; empty: no model at all).

        A ``pin`` goes into the signed ``edgefleet`` field as "pin" (protobuf JSON mapping), so
        the device honours only pins the director signed; without one the field has no "pin".
        A non-empty ``config`` goes in as "config" the same way, after ``validate_config``: an
        invalid one is refused (RepositoryRefusal) before anything is signed.
        """
        self.assign_many(session, [Assignment(device_id, generation, tuple(releases), pin, config)])

    def assign_many(self, session: Session, assignments: Sequence[Assignment]) -> None:
        """``assign`` for many devices at once: each device's targets, snapshot and timestamp are
        signed exactly as ``assign`` signs them, but what they share is read once (the image
        targets, the director root, its signers), every device's latest versions in one query,
        and all the new metadata is stored by one bulk insert. Any refusal (an invalid config,
        a release the image repository lacks) is raised before anything is stored."""
        if not assignments:
            return
        for assignment in assignments:
            if assignment.config is not None:
                try:
                    validate_config(assignment.config)
                except InvalidConfig as exc:
                    raise RepositoryRefusal(
                        f"device config of {assignment.device_id} refused: {exc}"
                    ) from exc
        device_ids = sorted({a.device_id for a in assignments})
        lock_repositories(session, DIRECTOR, device_ids)
        image = self.image_targets(session)
        if image is None:
            raise RepositoryRefusal("the image repository is empty; push a bundle first")
        image_targets = Metadata[Targets].from_bytes(image).signed
        root = self.root(session, DIRECTOR)
        signers: dict[str, list[Signer]] = {
            role: list(self.keys.signers(DIRECTOR, role, root=root)) for role in _DIRECTOR_ROLES
        }
        versions = latest_versions(session, DIRECTOR, device_ids)
        signed: list[Metadata[Any]] = []
        owners: list[str] = []
        releases: dict[tuple[str, int], dict[str, TargetFile]] = {}  # each release's targets, read once
        for assignment in assignments:
            files = self._director_files(image_targets, assignment.releases, releases)
            for metadata in self._sign_director(assignment, files, versions, signers):
                signed.append(metadata)
                owners.append(assignment.device_id)
        store_many(session, DIRECTOR, owners, signed)

    @staticmethod
    def _director_files(
        image_targets: Targets,
        releases: Sequence[tuple[str, int]],
        known: dict[tuple[str, int], dict[str, TargetFile]],
    ) -> dict[str, TargetFile]:
        """The director target files listing ``releases``; ``known`` keeps each release's files
        once found (reading them parses every image target)."""
        files: dict[str, TargetFile] = {}
        for bundle, version in releases:
            if (bundle, version) not in known:
                release = uptane.release_targets(image_targets, bundle, version)
                if not release:
                    raise RepositoryRefusal(f"{bundle}@{version} is not in the image repository")
                known[bundle, version] = {
                    path: TargetFile(t.info.length, {"sha256": t.info.sha256}, path)
                    for path, t in release.items()
                }
            files.update(known[bundle, version])
        return files

    def _sign_director(
        self,
        assignment: Assignment,
        files: dict[str, TargetFile],
        versions: dict[tuple[str, str], int],
        signers: dict[str, list[Signer]],
    ) -> list[Metadata[Any]]:
        """One device's new targets, snapshot and timestamp, signed; ``versions`` (latest per
        device and role) moves on with them."""
        device_id = assignment.device_id

        def next_version(role: str) -> int:
            versions[device_id, role] = versions.get((device_id, role), 0) + 1
            return versions[device_id, role]

        def sign(signed: Signed) -> Metadata[Any]:
            metadata: Metadata[Any] = Metadata(signed)
            for signer in signers[signed.type]:
                metadata.sign(signer, append=True)
            return metadata

        now = datetime.now(UTC)
        targets = Targets(
            version=next_version("targets"),
            expires=now + self.expiry.director_targets,
            targets=files,
            unrecognized_fields=director_fields(
                device_id, assignment.generation, assignment.releases, assignment.pin, assignment.config
            ),
        )
        snapshot = Snapshot(
            version=next_version("snapshot"),
            expires=now + self.expiry.director_snapshot,
            meta={"targets.json": MetaFile(version=targets.version)},
        )
        timestamp = Timestamp(
            version=next_version("timestamp"),
            expires=now + self.expiry.director_timestamp,
            snapshot_meta=MetaFile(version=snapshot.version),
        )
        return [sign(targets), sign(snapshot), sign(timestamp)]

    def _director_devices(self, session: Session) -> list[str]:
        return list(
            session.exec(
                select(TufMetadata.device_id)
                .where(TufMetadata.repository == DIRECTOR, TufMetadata.role == "targets")
                .distinct()
            ).all()
        )

    def _resign_director(self, session: Session, device_id: str) -> None:
        lock_repository(session, DIRECTOR, device_id)
        row = self._latest(session, DIRECTOR, device_id, "targets")
        assert row is not None
        old = Metadata[Targets].from_bytes(row.data).signed
        targets = Targets(
            version=old.version + 1,
            expires=datetime.now(UTC) + self.expiry.director_targets,
            targets=old.targets,
            unrecognized_fields=old.unrecognized_fields,
        )
        self._store(session, DIRECTOR, device_id, self._sign(DIRECTOR, targets, "targets", session))
        self._sign_snapshot_and_timestamp(
            session,
            DIRECTOR,
            device_id,
            targets.version,
            self.expiry.director_snapshot,
            self.expiry.director_timestamp,
        )

    # -- serving and upkeep --------------------------------------------------------------

    def lookup(self, session: Session, *, repo: str, device_id: str, name: str) -> bytes | None:
        """The file a TUF client asked for, or None (the client reads that as 404)."""
        match = METADATA_NAME.match(name)
        if match is None:
            return None
        role, version = match["role"], match["version"]
        owner = IMAGE_DEVICE if repo == IMAGE or role == "root" else device_id
        if version is None:
            if role == "root":
                return None
            row = self._latest(session, repo, owner, role)
        else:
            row = session.get(TufMetadata, (repo, owner, role, int(version)))
        return row.data if row else None

    def refresh_expiring(self, session: Session) -> int:
        """Re-signs online metadata past half its lifetime; returns how many repositories.
        All in the caller's transaction: upkeep uses ``expiring`` and ``refresh_one`` instead,
        one small transaction per repository."""
        return sum(self.refresh_one(session, device_id) for device_id in self.expiring(session))

    def expiring(self, session: Session) -> list[str]:
        """The repositories whose timestamp is past half its lifetime: IMAGE_DEVICE for the
        image repository, else a device id (its director metadata)."""
        now = datetime.now(UTC)
        due: list[str] = []
        image_ts = self._latest(session, IMAGE, IMAGE_DEVICE, "timestamp")
        if image_ts is not None and self._due(image_ts, self.expiry.image_timestamp, now):
            due.append(IMAGE_DEVICE)
        for device_id in self._director_devices(session):
            ts = self._latest(session, DIRECTOR, device_id, "timestamp")
            if ts is not None and self._due(ts, self.expiry.director_timestamp, now):
                due.append(device_id)
        return due

    def refresh_one(self, session: Session, device_id: str) -> bool:
        """Re-signs one repository (IMAGE_DEVICE: the image one) if it is still due once its
        lock is held: a replica that re-signed it meanwhile leaves nothing to do. Returns
        whether it re-signed."""
        now = datetime.now(UTC)
        repo, lifetime = (
            (IMAGE, self.expiry.image_timestamp)
            if device_id == IMAGE_DEVICE
            else (DIRECTOR, self.expiry.director_timestamp)
        )
        lock_repository(session, repo, device_id)
        ts = self._latest(session, repo, device_id, "timestamp")
        if ts is None or not self._due(ts, lifetime, now):
            return False
        if repo == IMAGE:
            self._sign_image_snapshot(session)
        else:
            self._resign_director(session, device_id)
        return True

    @staticmethod
    def _due(timestamp: TufMetadata, lifetime: timedelta, now: datetime) -> bool:
        return as_utc(timestamp.expires_at) - now < lifetime / 2
