"""Receives one pushed bundle: the header first, then each artifact's bytes in order.

Every artifact is checked against the release's signed length and hash while it streams in
and becomes visible in the blob store only once it matched (on PostgreSQL, to every replica at
once). A refusal is a ``PushRefused``; its status is the refusal table's (``refusals``).
"""

from __future__ import annotations

import asyncio

from tuf.api.metadata import Root

from edgefleet.controlplane.api.limits import first_few
from edgefleet.controlplane.store.blobs import BlobError, BlobStore, BlobWriter
from edgefleet.protos.fleet import release
from edgefleet.protos.fleet.v1 import operator_pb2


class PushRefused(Exception):
    """The pushed bundle cannot be accepted as sent (out of order, unsigned, a mismatch)."""


def invalid(message: str) -> PushRefused:
    return PushRefused(message)


class BundleUpload:
    def __init__(self, *, blobs: BlobStore, image_root: Root) -> None:
        self.blobs = blobs
        self.image_root = image_root
        self.release: release.VerifiedRelease | None = None
        self.image_targets = b""
        self._writer: BlobWriter | None = None
        self._current = ""
        self._done: set[str] = set()

    async def receive(self, message: operator_pb2.PushBundleRequest) -> None:
        if message.HasField("header"):
            if self.release is not None:
                raise invalid("push header sent twice")
            try:
                self.release = release.verify_release(message.header.release_metadata, root=self.image_root)
            except release.ReleaseError as exc:
                raise invalid(f"{type(exc).__name__}: {exc}") from exc
            self.image_targets = message.header.image_targets
            return
        if self.release is None:
            raise invalid("the push header must come first")
        part = message.artifact
        if part.path != self._current:
            await self._commit_current()
            info = self.release.artifacts.get(part.path)
            if info is None:
                raise invalid(f"artifact {part.path!r} is not in the release")
            if part.path in self._done:
                raise invalid(f"artifact {part.path!r} sent twice")
            self._current = part.path
            try:
                # Off the loop: on PostgreSQL this opens the connection the artifact streams into.
                self._writer = await asyncio.to_thread(self.blobs.writer, info)
            except BlobError as exc:  # e.g. a signed sha256 that is not 64 hex digits
                raise invalid(f"artifact {part.path!r}: {type(exc).__name__}: {exc}") from exc
        assert self._writer is not None
        try:
            await asyncio.to_thread(self._writer.write, part.data)
        except release.ArtifactError as exc:
            raise invalid(f"{type(exc).__name__}: {exc}") from exc

    async def _commit_current(self) -> None:
        if self._writer is None:
            return
        try:
            await asyncio.to_thread(self._writer.commit)
        except release.ArtifactError as exc:
            raise invalid(f"{type(exc).__name__}: {exc}") from exc
        finally:
            self._writer.abort()
            self._writer = None
        self._done.add(self._current)

    async def finish(self) -> release.VerifiedRelease:
        """Commits the last artifact and checks every artifact of the release is stored."""
        await self._commit_current()
        if self.release is None:
            raise invalid("no release metadata received")
        try:
            missing = await asyncio.to_thread(self._missing, self.release)
        except BlobError as exc:
            raise invalid(f"{type(exc).__name__}: {exc}") from exc
        if missing:
            raise invalid(first_few(missing, what="artifact(s) missing"))
        return self.release

    def _missing(self, verified: release.VerifiedRelease) -> list[str]:
        """The release's artifacts the blob store does not hold (queries: run off the loop)."""
        return [p for p, info in verified.artifacts.items() if not self.blobs.exists(info.sha256)]

    def abort(self) -> None:
        if self._writer is not None:
            self._writer.abort()
            self._writer = None
