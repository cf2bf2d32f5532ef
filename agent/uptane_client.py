"""Uptane verification on the device: both repositories through python-tuf's ngclient.

The director says which release this device should run; the image repository says what that
release's artifacts are. ngclient checks signatures, thresholds, expiry, versions (rollback)
and root rotation for each; this module adds what Uptane adds on top: the director's targets
must be for this device and must match the image repository's exactly.

Metadata travels over the device's gRPC channel (``DeviceService.FetchMetadata``), through a
fetcher of ours. ngclient is synchronous: call ``refresh`` from a worker thread.
"""

from __future__ import annotations

import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
from tuf.api import exceptions as tuf_errors
from tuf.api.metadata import Targets
from tuf.ngclient import FetcherInterface, Updater, UpdaterConfig

from agent.errors import ControlPlaneUnavailable
from protos.fleet import release as rel
from protos.fleet import uptane
from protos.fleet.v1 import bundle_pb2, common_pb2, device_pb2, device_pb2_grpc

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


def _translate(exc: Exception, repo: str) -> Exception:
    """ngclient's exceptions, as the typed refusals the agent reports."""
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
