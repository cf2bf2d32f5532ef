"""Uptane verification on the device: both repositories through python-tuf's ngclient.

The director says which release this device should run; the image repository says what that
release's artifacts are. ngclient checks signatures, thresholds, expiry, versions (rollback)
and root rotation for each; this module adds what Uptane adds on top: the director's targets
must be for this device and must match the image repository's exactly.

Metadata travels over the device's gRPC channel (``DeviceService.FetchMetadata``), through a
fetcher of ours. ngclient is synchronous: call ``refresh`` from a worker thread.
"""

from __future__ import annotations

import hashlib
import logging
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from tuf.api import exceptions as tuf_errors
from tuf.api.metadata import Metadata, Root, Targets
from tuf.ngclient import FetcherInterface, Updater, UpdaterConfig

from edgefleet.agent.update.errors import ControlPlaneUnavailable
from edgefleet.agent.update.state import AgentState, InstallRecord
from edgefleet.protos.fleet import release as rel
from edgefleet.protos.fleet import uptane
from edgefleet.protos.fleet.v1 import bundle_pb2, common_pb2, device_pb2, device_pb2_grpc

log = logging.getLogger(__name__)

SCHEME = "edgefleet"
REPOSITORY_IDS = {uptane.IMAGE: device_pb2.REPOSITORY_IMAGE, uptane.DIRECTOR: device_pb2.REPOSITORY_DIRECTOR}
FETCH_TIMEOUT_SECONDS = 30.0


class GrpcMetadataFetcher(FetcherInterface):
    """Serves ngclient's metadata downloads from the control plane over gRPC.

    A missing file is reported as HTTP 404, which ngclient reads as "no newer root".
    """

    def __init__(self, stub: Callable[[], device_pb2_grpc.DeviceServiceStub]) -> None:
        self._stub = stub  # asked on every fetch: certificate renewal replaces the channel

    def _fetch(self, url: str) -> Iterator[bytes]:
        parsed = urllib.parse.urlsplit(url)
        repository = REPOSITORY_IDS.get(parsed.netloc)
        if parsed.scheme != SCHEME or repository is None:
            raise tuf_errors.DownloadError(f"not an edgefleet metadata URL: {url}")
        name = urllib.parse.unquote(parsed.path.lstrip("/"))
        try:
            response = self._stub().FetchMetadata(
                device_pb2.FetchMetadataRequest(repository=repository, name=name),
                timeout=FETCH_TIMEOUT_SECONDS,
            )
        except grpc.RpcError as exc:
            code = exc.code() if isinstance(exc, grpc.Call) else None
            if code == grpc.StatusCode.NOT_FOUND:
                raise tuf_errors.DownloadHTTPError(f"{url} not found", 404) from exc
            raise tuf_errors.DownloadError(f"{url}: {code.name if code else exc}") from exc
        return iter([response.data])


@dataclass(frozen=True, slots=True)
class Assignment:
    """The releases both repositories agree this device should hold (one per bundle name;
    none: the device should hold no model)."""

    generation: int
    releases: tuple[rel.VerifiedRelease, ...]
    pin: common_pb2.VariantPin | None = None  # from the verified director targets, never the nudge
    config: common_pb2.DeviceConfig | None = None  # likewise; its ranges are checked where it is applied


def _translate(exc: Exception, repo: str) -> rel.Refusal | rel.TransientFailure:
    """ngclient's exceptions by family, as python-tuf sorts them: a RepositoryError is a typed
    refusal the agent reports, a DownloadError (other than a too-long download) is transient."""
    if isinstance(exc, tuf_errors.UnsignedMetadataError):
        return rel.UntrustedMetadata(f"{repo}: {exc}")
    if isinstance(exc, tuf_errors.ExpiredMetadataError):
        return rel.ExpiredMetadata(f"{repo}: {exc}")
    if isinstance(exc, tuf_errors.BadVersionNumberError):
        return rel.ReplayedMetadata(f"{repo}: {exc}")
    if isinstance(exc, tuf_errors.LengthOrHashMismatchError):
        return rel.MetadataMismatch(f"{repo}: {exc}")
    if isinstance(exc, tuf_errors.DownloadLengthMismatchError):
        return rel.MetadataTooLong(f"{repo}: {exc}")
    if isinstance(exc, tuf_errors.DownloadError):
        return ControlPlaneUnavailable(f"{repo} metadata unavailable: {exc}")
    return rel.MalformedMetadata(f"{repo}: {type(exc).__name__}: {exc}")


class UptaneVerifier:
    """Holds each repository's trusted metadata under ``tuf_dir`` and refreshes both on demand."""

    def __init__(
        self,
        *,
        tuf_dir: Path,
        anchors: uptane.TrustAnchors,
        fetcher: FetcherInterface,
        device_id: str,
    ) -> None:
        self.tuf_dir = tuf_dir
        self.anchors = anchors
        self.fetcher = fetcher
        self.device_id = device_id

    def _updater(self, repo: str, bootstrap: bytes) -> Updater:
        directory = self.tuf_dir / repo
        directory.mkdir(parents=True, exist_ok=True)
        return Updater(
            metadata_dir=str(directory),
            metadata_base_url=f"{SCHEME}://{repo}/",
            fetcher=self.fetcher,
            config=UpdaterConfig(prefix_targets_with_hash=False),
            bootstrap=bootstrap,
        )

    def _refreshed(self, repo: str, bootstrap: bytes) -> Updater:
        try:
            updater = self._updater(repo, bootstrap)
            updater.refresh()
        except (tuf_errors.RepositoryError, tuf_errors.DownloadError) as exc:
            raise _translate(exc, repo) from exc
        return updater

    def refresh(self) -> Assignment:
        """The verified assignment (releases may be empty: the device should hold no model)."""
        director = self._refreshed(uptane.DIRECTOR, self.anchors.director_root)
        # ngclient verified and holds the director's top-level targets; it has no public
        # accessor for the whole listing, which Uptane needs (the custom fields and every path).
        director_targets: Targets = director._trusted_set.targets
        assignment = uptane.parse_director_targets(director_targets)
        if assignment.device_id != self.device_id:
            raise rel.TargetForAnotherDevice(
                f"director metadata is for {assignment.device_id}, this device is {self.device_id}"
            )
        image = self._refreshed(uptane.IMAGE, self.anchors.image_root)
        assigned = dict(assignment.releases)
        variants: dict[str, list[bundle_pb2.Variant]] = {name: [] for name in assigned}
        artifacts: dict[str, dict[str, rel.ArtifactInfo]] = {name: {} for name in assigned}
        bases: dict[str, bundle_pb2.AdapterBase | None] = {}
        for path, wanted in assignment.targets.items():
            try:
                target = image.get_targetinfo(path)
            except (tuf_errors.RepositoryError, tuf_errors.DownloadError) as exc:
                raise _translate(exc, uptane.IMAGE) from exc
            if target is None:
                raise rel.UnknownTarget(
                    f"the director names {path!r}, which the image repository does not list"
                )
            image_target = uptane.parse_image_target(path, target)
            if (image_target.info.length, image_target.info.sha256) != (wanted.length, wanted.sha256):
                raise rel.DirectorImageMismatch(f"director and image repositories disagree on {path!r}")
            if assigned.get(image_target.bundle) != image_target.version:
                listed = ", ".join(f"{n}@{v}" for n, v in assignment.releases) or "nothing"
                raise rel.DirectorImageMismatch(
                    f"{path!r} belongs to {image_target.bundle}@{image_target.version}, "
                    f"the director assigns {listed}"
                )
            variant = bundle_pb2.Variant()
            variant.CopyFrom(image_target.variant)
            variant.artifact = path
            variants[image_target.bundle].append(variant)
            artifacts[image_target.bundle][path] = image_target.info
            base = image_target.adapter_base
            if bases.setdefault(image_target.bundle, base) != base:
                raise rel.ManifestMismatch(f"the targets of {image_target.bundle} name different bases")
        releases = []
        for name, version in assignment.releases:
            if not variants[name]:
                raise rel.UnknownTarget(
                    f"the director assigns {name}@{version} but names none of its targets"
                )
            manifest = bundle_pb2.BundleManifest(
                schema_version=rel.MANIFEST_SCHEMA_VERSION,
                name=name,
                version=version,
                variants=variants[name],
            )
            if (base := bases.get(name)) is not None:
                manifest.adapter_base.CopyFrom(base)
            releases.append(
                rel.VerifiedRelease(
                    name=name,
                    version=version,
                    expires=director_targets.expires,
                    manifest=manifest,
                    artifacts=artifacts[name],
                    metadata=b"",
                )
            )
        return Assignment(
            generation=assignment.generation,
            releases=tuple(releases),
            pin=assignment.pin,
            config=assignment.config,
        )


# -- what is verifiably installed, from the disk alone ---------------------------------------------

MAX_ROOT_ROTATIONS = 1024
"""Bound on the root versions walked from the provisioned root to the one on disk."""

HASH_CHUNK = 1 << 20


class NotRecoverable(rel.Refusal):
    """The trusted metadata on disk cannot vouch for anything (missing, unsigned, malformed)."""


@dataclass(frozen=True, slots=True)
class RecoveredInstall:
    """An artifact on disk whose bytes hash to a target the image repository signed."""

    target: uptane.ImageTarget


@dataclass
class Recovery:
    """What the disk proves is installed, and what it could not prove (for the log and status)."""

    installs: list[RecoveredInstall] = field(default_factory=list)
    assigned: dict[str, int] | None = None  # the director's last verified assignment, if readable
    problems: list[str] = field(default_factory=list)


def _signed_root(anchor: bytes, repo_dir: Path) -> Root:
    """The newest root on disk that chains to the provisioned ``anchor``, each step signed by
    the previous root and by itself, as ngclient checks a rotation; expiry is not checked (the
    metadata vouched for these bytes when they were installed; freshness guards new installs)."""
    root = Metadata[Root].from_bytes(anchor).signed
    newest = Metadata[Root].from_bytes((repo_dir / "root.json").read_bytes())
    for _ in range(MAX_ROOT_ROTATIONS):
        if newest.signed.version <= root.version:
            return root
        version = root.version + 1
        candidate = repo_dir / "root_history" / f"{version}.root.json"
        step = Metadata[Root].from_bytes(candidate.read_bytes()) if candidate.is_file() else newest
        if step.signed.version != version:
            raise NotRecoverable(
                f"{repo_dir.name}: no root version {version} on disk to reach version {newest.signed.version}"
            )
        root.verify_delegate(Root.type, step.signed_bytes, step.signatures)
        step.signed.verify_delegate(Root.type, step.signed_bytes, step.signatures)
        root = step.signed
    raise NotRecoverable(f"{repo_dir.name}: more than {MAX_ROOT_ROTATIONS} root rotations")


def _signed_targets(anchor: bytes, repo_dir: Path) -> Targets:
    """The repository's targets metadata on disk, if the trusted root's targets keys signed it."""
    try:
        root = _signed_root(anchor, repo_dir)
        md = Metadata[Targets].from_bytes((repo_dir / "targets.json").read_bytes())
        root.verify_delegate(Targets.type, md.signed_bytes, md.signatures)
    except NotRecoverable:
        raise
    except (OSError, ValueError, tuf_errors.RepositoryError) as exc:
        raise NotRecoverable(f"{repo_dir.name} metadata on disk: {type(exc).__name__}: {exc}") from exc
    except Exception as exc:  # python-tuf raises several types for malformed input
        raise NotRecoverable(f"{repo_dir.name} metadata on disk is malformed: {exc}") from exc
    return md.signed


def _hash_file(path: Path, limit: int) -> str | None:
    """The file's sha256, or None when it is longer than ``limit`` (it cannot be the target)."""
    digest = hashlib.sha256()
    read = 0
    with path.open("rb") as f:
        while chunk := f.read(HASH_CHUNK):
            read += len(chunk)
            if read > limit:
                return None
            digest.update(chunk)
    return digest.hexdigest()


def recover_installed(*, tuf_dir: Path, anchors: uptane.TrustAnchors, artifact_dir: Path) -> Recovery:
    """Which releases are verifiably installed, from the disk alone: every stored artifact whose
    bytes hash (re-checked now) to a target of the image repository's signed targets on disk,
    and the releases the director last assigned. Used when the state file is lost; nothing is
    fetched, so a device without its control plane can still rebuild what it serves."""
    recovery = Recovery()
    try:
        image = _signed_targets(anchors.image_root, tuf_dir / uptane.IMAGE)
    except NotRecoverable as exc:
        recovery.problems.append(str(exc))
        return recovery
    try:
        director = uptane.parse_director_targets(
            _signed_targets(anchors.director_root, tuf_dir / uptane.DIRECTOR)
        )
        recovery.assigned = dict(director.releases)
    except (NotRecoverable, rel.ReleaseError) as exc:
        recovery.problems.append(f"the director's assignment is unknown: {exc}")
    by_sha: dict[str, uptane.ImageTarget] = {}
    for path, target in image.targets.items():
        try:
            parsed = uptane.parse_image_target(path, target)
        except rel.ReleaseError as exc:
            recovery.problems.append(str(exc))
            continue
        by_sha[parsed.info.sha256] = parsed
    if not artifact_dir.is_dir():
        recovery.problems.append(f"no artifact store at {artifact_dir}")
        return recovery
    for entry in sorted(artifact_dir.iterdir()):
        signed = by_sha.get(entry.name)
        if signed is None or not entry.is_file() or entry.is_symlink():
            recovery.problems.append(f"{entry.name[:12]} in {artifact_dir} is no signed target")
            continue
        if entry.stat().st_size != signed.info.length or _hash_file(entry, signed.info.length) != entry.name:
            recovery.problems.append(
                f"{entry.name[:12]} ({signed.bundle}@{signed.version}) does not match its signed hash"
            )
            continue
        recovery.installs.append(RecoveredInstall(signed))
    return recovery


def rebuilt_state(recovery: Recovery) -> AgentState:
    """A state serving, per bundle name, the release the director assigned when its verified
    artifact is on disk, else the newest verified release of that name on disk (the one it
    replaced); names the director no longer assigns are left out. Generations are 0: nothing is
    claimed applied, so the control plane's next nudge applies its generation again, finding
    these models already serving. ``recovery.problems`` gains what could not be served."""
    by_name: dict[str, list[uptane.ImageTarget]] = {}
    for install in recovery.installs:
        by_name.setdefault(install.target.bundle, []).append(install.target)
    assigned = recovery.assigned
    records = []
    for name, targets in sorted(by_name.items()):
        if assigned is not None and name not in assigned:
            continue
        wanted = [t for t in targets if assigned is not None and t.version == assigned[name]]
        chosen = max(wanted or targets, key=lambda t: (t.version, t.variant.id))
        if assigned is not None and not wanted:
            recovery.problems.append(
                f"{name}@{assigned[name]} is assigned but not on disk; serving {name}@{chosen.version}"
            )
        records.append(
            InstallRecord(
                bundle=name,
                version=chosen.version,
                generation=0,
                variant=chosen.variant.id,
                model_format=chosen.variant.format,
                artifact_sha256=chosen.info.sha256,
                length=chosen.info.length,
                # An adapter goes back over its base (loaded at boot only if that base is there).
                adapter_of=chosen.adapter_base.name if chosen.adapter_base else "",
                base_sha256=chosen.adapter_base.artifact_sha256 if chosen.adapter_base else "",
            )
        )
    for name, version in sorted((assigned or {}).items()):
        if name not in by_name:
            recovery.problems.append(
                f"{name}@{version} is assigned but no verified artifact of it is on disk"
            )
    phase = common_pb2.DEVICE_STATE_ACTIVE if records else common_pb2.DEVICE_STATE_IDLE
    return AgentState(phase=phase, models=tuple(records))
