"""OperatorService: bundles, enrollment tokens, deployments, fleet and telemetry queries."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from datetime import timedelta

import grpc
from google.protobuf import json_format
from google.protobuf.timestamp_pb2 import Timestamp
from sqlmodel import Session

from controlplane.blobs import BlobStore
from controlplane.db import crud
from controlplane.db.database import Database
from controlplane.db.models import Bundle, Device
from controlplane.keys import KeyStoreError
from controlplane.notifier import DesiredStateNotifier
from controlplane.repositories import Repositories, RepositoryRefusal
from controlplane.services.auth import Context, new_secret, secret_sha256
from controlplane.services.bundle_upload import BundleUpload, PushRefused
from protos.fleet.uptane import DIRECTOR, IMAGE
from protos.fleet.v1 import bundle_pb2, common_pb2, operator_pb2, operator_pb2_grpc

DEFAULT_TOKEN_TTL = timedelta(hours=24)
MAX_TOKEN_USES = 100_000
MAX_TELEMETRY_ROWS = 10_000


def timestamp(value: object) -> Timestamp:
    ts = Timestamp()
    if value is not None:
        ts.FromDatetime(crud.as_utc(value))  # type: ignore[arg-type]
    return ts


def device_summary(device: Device, desired: Bundle | None) -> common_pb2.DeviceSummary:
    summary = common_pb2.DeviceSummary(
        device_id=device.id,
        state=device.state,  # type: ignore[arg-type]
        api_url=device.api_url,
        last_error=device.last_error,
        last_tokens_per_second=device.last_tokens_per_second,
        last_latency_ms=device.last_latency_ms,
        requests_total=device.requests_total,
        desired_generation=device.desired_generation,
        applied_generation=device.applied_generation,
        labels=device.labels,
        variant=device.variant,
    )
    if device.active_bundle:
        summary.active_bundle.CopyFrom(
            common_pb2.BundleRef(name=device.active_bundle, version=device.active_version)
        )
    if desired is not None:
        summary.desired_bundle.CopyFrom(common_pb2.BundleRef(name=desired.name, version=desired.version))
    if device.last_seen is not None:
        summary.last_seen.CopyFrom(timestamp(device.last_seen))
    return summary


class OperatorService(operator_pb2_grpc.OperatorServiceServicer):
    def __init__(
        self,
        *,
        db: Database,
        blobs: BlobStore,
        notifier: DesiredStateNotifier,
        repositories: Repositories,
    ) -> None:
        self.db = db
        self.blobs = blobs
        self.notifier = notifier
        self.repositories = repositories

    async def PushBundle(
        self,
        request_iterator: AsyncIterator[operator_pb2.PushBundleRequest],
        context: Context,
    ) -> operator_pb2.PushBundleResponse:
        image_root = await self.db.run(lambda s: self.repositories.root(s, IMAGE))
        upload = BundleUpload(blobs=self.blobs, image_root=image_root)
        refusal: PushRefused | None = None
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
        if refusal is not None:
            await context.abort(refusal.code, refusal.message)
        image_targets = upload.image_targets
        rel = verified

        def record(session: Session) -> bool:
            _, present = crud.add_bundle(session, release=rel)
            if not present:
                self.repositories.publish_image_targets(session, image_targets, release=rel)
            return present

        try:
            present = await self.db.run(record)
        except crud.BundleExists as exc:
            await context.abort(grpc.StatusCode.ALREADY_EXISTS, str(exc))
        except RepositoryRefusal as exc:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
        return operator_pb2.PushBundleResponse(
            bundle=common_pb2.BundleRef(name=rel.name, version=rel.version), already_present=present
        )

    async def ListBundles(
        self, request: operator_pb2.ListBundlesRequest, context: Context
    ) -> operator_pb2.ListBundlesResponse:
        bundles = await self.db.run(crud.list_bundles)
        return operator_pb2.ListBundlesResponse(
            bundles=[
                operator_pb2.BundleInfo(
                    manifest=json_format.ParseDict(
                        json.loads(b.manifest_json), bundle_pb2.BundleManifest(), ignore_unknown_fields=True
                    ),
                    created=timestamp(b.created_at),
                    expires=timestamp(b.expires_at),
                    total_bytes=b.total_bytes,
                )
                for b in bundles
            ]
        )

    async def CreateToken(
        self, request: operator_pb2.CreateTokenRequest, context: Context
    ) -> operator_pb2.CreateTokenResponse:
        uses = request.uses or 1
        if uses > MAX_TOKEN_USES:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"uses must be at most {MAX_TOKEN_USES}")
        ttl = timedelta(seconds=request.ttl_seconds) if request.ttl_seconds else DEFAULT_TOKEN_TTL
        token = new_secret()
        row = await self.db.run(
            lambda s: crud.create_token(
                s, token_sha256=secret_sha256(token), uses=uses, ttl=ttl, labels=dict(request.labels)
            )
        )
        return operator_pb2.CreateTokenResponse(token=token, expires=timestamp(row.expires_at), uses=uses)

    async def Deploy(
        self, request: operator_pb2.DeployRequest, context: Context
    ) -> operator_pb2.DeployResponse:
        if request.all_devices == bool(request.device_ids):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "give either all_devices or device_ids")

        def deploy(session: Session) -> list[crud.DeployedTo]:
            bundle = crud.get_bundle(session, name=request.bundle.name, version=request.bundle.version)
            assert bundle is not None
            ids = None if request.all_devices else list(request.device_ids)
            deployed = crud.deploy(session, bundle=bundle, device_ids=ids)
            for target in deployed:
                self.repositories.assign(
                    session,
                    device_id=target.device_id,
                    generation=target.generation,
                    bundle=bundle.name,
                    version=bundle.version,
                )
            return deployed

        try:
            deployed = await self.db.run(deploy)
        except (crud.BundleNotFound, crud.DeviceNotFound) as exc:
            await context.abort(grpc.StatusCode.NOT_FOUND, str(exc))
        except RepositoryRefusal as exc:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
        self.notifier.notify([d.device_id for d in deployed])
        return operator_pb2.DeployResponse(
            device_ids=[d.device_id for d in deployed],
            max_generation=max((d.generation for d in deployed), default=0),
        )

    async def ListDevices(
        self, request: operator_pb2.ListDevicesRequest, context: Context
    ) -> operator_pb2.ListDevicesResponse:
        def summaries(session: Session) -> list[common_pb2.DeviceSummary]:
            return [
                device_summary(d, session.get(Bundle, d.desired_bundle_id) if d.desired_bundle_id else None)
                for d in crud.list_devices(session)
            ]

        return operator_pb2.ListDevicesResponse(devices=await self.db.run(summaries))

    async def QueryTelemetry(
        self, request: operator_pb2.QueryTelemetryRequest, context: Context
    ) -> operator_pb2.QueryTelemetryResponse:
        limit = min(request.limit or 100, MAX_TELEMETRY_ROWS)
        rows = await self.db.run(
            lambda s: crud.query_telemetry(
                s, device_id=request.device_id or None, kind=request.kind or None, limit=limit
            )
        )
        return operator_pb2.QueryTelemetryResponse(
            rows=[
                operator_pb2.TelemetryRow(
                    device_id=r.device_id,
                    kind=r.kind,
                    seq=r.seq,
                    time=timestamp(r.time),
                    payload_json=json.dumps(r.payload, sort_keys=True),
                )
                for r in rows
            ]
        )

    async def GetImageTargets(
        self, request: operator_pb2.GetImageTargetsRequest, context: Context
    ) -> operator_pb2.GetImageTargetsResponse:
        data = await self.db.run(self.repositories.image_targets)
        return operator_pb2.GetImageTargetsResponse(targets=data or b"")

    async def PushRoot(
        self, request: operator_pb2.PushRootRequest, context: Context
    ) -> operator_pb2.PushRootResponse:
        if request.repository not in (IMAGE, DIRECTOR):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "repository must be 'image' or 'director'")
        try:
            version = await self.db.run(
                lambda s: self.repositories.push_root(s, request.repository, request.root)
            )
        except (RepositoryRefusal, KeyStoreError) as exc:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
        return operator_pb2.PushRootResponse(version=version)
