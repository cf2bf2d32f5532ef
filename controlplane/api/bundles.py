"""OperatorService's bundle RPCs: pushing a bundle, listing bundles, and the image targets
that list what devices may install (read, and re-signed by an admin)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

from google.protobuf import json_format
from sqlmodel import Session

from edgefleet.controlplane.api import pages
from edgefleet.controlplane.api.auth import Context, authorize
from edgefleet.controlplane.api.bundle_upload import BundleUpload, PushRefused
from edgefleet.controlplane.api.operator_parts import OperatorParts, timestamp
from edgefleet.controlplane.api.refusals import refused
from edgefleet.controlplane.fleet.bundles import publish_bundle, publish_image_targets
from edgefleet.controlplane.fleet.rbac import Role
from edgefleet.controlplane.store.bundles import list_bundles
from edgefleet.controlplane.store.models import Bundle
from edgefleet.protos.fleet.release import VerifiedRelease
from edgefleet.protos.fleet.uptane import IMAGE
from edgefleet.protos.fleet.v1 import bundle_pb2, common_pb2, operator_pb2

BUNDLES = pages.PageSpec("ListBundles", default_size=100, max_size=1000)


def bundle_info(b: Bundle) -> operator_pb2.BundleInfo:
    return operator_pb2.BundleInfo(
        manifest=json_format.ParseDict(
            json.loads(b.manifest_json), bundle_pb2.BundleManifest(), ignore_unknown_fields=True
        ),
        created=timestamp(b.created_at),
        expires=timestamp(b.expires_at),
        total_bytes=b.total_bytes,
    )


class BundleRpcs(OperatorParts):
    async def PushBundle(
        self,
        request_iterator: AsyncIterator[operator_pb2.PushBundleRequest],
        context: Context,
    ) -> operator_pb2.PushBundleResponse:
        """Receives the release and its artifacts (``bundle_upload``), then records and
        publishes it in one transaction; a refusal of either is audited as bundle.push."""
        who = await authorize(self.db, context, Role.OPERATOR)
        image_root = await self.db.run(lambda s: self.repositories.root(s, IMAGE))
        upload = BundleUpload(blobs=self.blobs, image_root=image_root)
        refusal: PushRefused | None = None
        verified: VerifiedRelease | None = None
        try:
            async for message in request_iterator:
                if refusal is not None:
                    continue  # drain, so the client reads our status instead of a broken stream
                try:
                    await upload.receive(message)
                except PushRefused as exc:
                    refusal = exc
                    upload.abort()
            if refusal is None:
                verified = await upload.finish()
        except PushRefused as exc:
            refusal = exc
        finally:
            upload.abort()
        pushed = f"{upload.release.name}@{upload.release.version}" if upload.release else "?"
        if refusal is not None:
            raise refused(refusal, action="bundle.push", target=pushed) from refusal
        assert verified is not None  # finish() returned: no refusal
        rel, image_targets = verified, upload.image_targets

        def publish(session: Session) -> bool:
            return publish_bundle(
                session, self.repositories, actor=who.actor, release=rel, image_targets=image_targets
            )

        present = await self.command(publish, action="bundle.push", target=pushed)
        return operator_pb2.PushBundleResponse(
            bundle=common_pb2.BundleRef(name=rel.name, version=rel.version), already_present=present
        )

    async def ListBundles(
        self, request: operator_pb2.ListBundlesRequest, context: Context
    ) -> operator_pb2.ListBundlesResponse:
        """A page of bundles by name and version."""
        await authorize(self.db, context, Role.VIEWER)
        size = BUNDLES.size(request.page_size)
        key = pages.decode_token(BUNDLES, request.page_token, {})
        after: tuple[str, int] | None = None
        if key is not None:
            match key:
                case [str(name), int(version)]:
                    after = (name, version)
                case _:
                    raise pages.InvalidPageToken("page_token is not one this method issued")

        def query(session: Session) -> pages.Page[operator_pb2.BundleInfo]:
            rows = list_bundles(session, after=after, limit=size + 1)
            return pages.cut(
                BUNDLES, rows, size=size, encode=bundle_info, key=lambda b: [b.name, b.version], filters={}
            )

        page = await self.db.run(query)
        return operator_pb2.ListBundlesResponse(bundles=page.items, next_page_token=page.next_page_token)

    async def GetImageTargets(
        self, request: operator_pb2.GetImageTargetsRequest, context: Context
    ) -> operator_pb2.GetImageTargetsResponse:
        await authorize(self.db, context, Role.VIEWER)
        data = await self.db.run(self.repositories.image_targets)
        return operator_pb2.GetImageTargetsResponse(targets=data or b"")

    async def PublishImageTargets(
        self, request: operator_pb2.PublishImageTargetsRequest, context: Context
    ) -> operator_pb2.PublishImageTargetsResponse:
        who = await authorize(self.db, context, Role.ADMIN)
        version = await self.command(
            lambda s: publish_image_targets(s, self.repositories, actor=who.actor, targets=request.targets),
            action="image.resign",
            target="image-targets",
        )
        return operator_pb2.PublishImageTargetsResponse(version=version)
