"""OperatorService: bundles, enrollment tokens, deployments and undeployments, variant pins, fleet and
telemetry queries."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from datetime import UTC, timedelta
from functools import partial
from typing import Any, NoReturn

import grpc
from google.protobuf import json_format
from google.protobuf.timestamp_pb2 import Timestamp
from sqlmodel import Session, col, func, select

from edgefleet.controlplane.api import pages
from edgefleet.controlplane.api.auth import Context, new_secret, secret_sha256
from edgefleet.controlplane.api.bundle_upload import BundleUpload, PushRefused
from edgefleet.controlplane.api.guard import CallGuard, guarded
from edgefleet.controlplane.api.limits import MAX_NAME_CHARS, clip
from edgefleet.controlplane.api.ratelimit import RateLimit
from edgefleet.controlplane.api.refusals import Refused, invalid
from edgefleet.controlplane.api.rollouts import RolloutRpcs
from edgefleet.controlplane.fleet import audit
from edgefleet.controlplane.fleet.audit import MAX_DETAIL_BYTES, Outcome
from edgefleet.controlplane.fleet.notifier import DesiredStateNotifier
from edgefleet.controlplane.fleet.rbac import (
    OperatorExists,
    OperatorIdentity,
    Role,
    authorize,
    create_operator,
    list_operators,
    revoke_operator,
)
from edgefleet.controlplane.rollouts import director
from edgefleet.controlplane.rollouts.director import pin_message
from edgefleet.controlplane.rollouts.engine import EngineConfig, RolloutMachine
from edgefleet.controlplane.store import crud
from edgefleet.controlplane.store.blobs import BlobStore
from edgefleet.controlplane.store.database import Database
from edgefleet.controlplane.store.models import (
    AuditEntry,
    Bundle,
    Device,
    EnrollmentToken,
    OperatorToken,
    TelemetryRecord,
    utcnow,
)
from edgefleet.controlplane.trust.keys import KeyStoreError
from edgefleet.controlplane.trust.repositories import Repositories, RepositoryRefusal
from edgefleet.protos.fleet.topics import TopicKind
from edgefleet.protos.fleet.uptane import DIRECTOR, IMAGE
from edgefleet.protos.fleet.v1 import bundle_pb2, common_pb2, operator_pb2, operator_pb2_grpc

DEFAULT_TOKEN_TTL = timedelta(hours=24)
MAX_TOKEN_USES = 100_000
MAX_TELEMETRY_ROWS = 10_000  # TailTelemetry's backlog
TAIL_POLL_SECONDS = 0.5
TAIL_BATCH_ROWS = 500
MAX_PAYLOAD_CHARS = 256 * 1024  # one telemetry row's JSON as a reply carries it
MAX_SUMMARY_LABEL_KEY, MAX_SUMMARY_LABEL_VALUE = crud.MAX_LABEL_KEY, crud.MAX_LABEL_VALUE

DEVICES = pages.PageSpec("ListDevices", default_size=500, max_size=1000)
TELEMETRY = pages.PageSpec("QueryTelemetry", default_size=100, max_size=1000)
AUDIT = pages.PageSpec("ListAudit", default_size=100, max_size=1000)
BUNDLES = pages.PageSpec("ListBundles", default_size=100, max_size=1000)
OPERATORS = pages.PageSpec("ListOperators", default_size=100, max_size=1000)


def timestamp(value: object) -> Timestamp:
    ts = Timestamp()
    if value is not None:
        ts.FromDatetime(crud.as_utc(value))  # type: ignore[arg-type]
    return ts


def installed_models(device: Device) -> list[common_pb2.InstalledModel]:
    """The models the device last reported (stored by DeviceService.ReportStatus)."""
    return [
        common_pb2.InstalledModel(
            bundle=common_pb2.BundleRef(name=str(m.get("name", "")), version=int(m.get("version", 0))),
            variant=str(m.get("variant", "")),
            loaded=bool(m.get("loaded", False)),
        )
        for m in device.models
    ]


def listed_labels(labels: dict[str, str]) -> dict[str, str]:
    """A device's labels as listed: within the bounds labels have now, whatever was stored
    before they had them (one device's oversized labels once broke every fleet listing)."""
    kept = list(labels.items())[: crud.MAX_LABELS]
    return {k[:MAX_SUMMARY_LABEL_KEY]: v[:MAX_SUMMARY_LABEL_VALUE] for k, v in kept}


def device_summary(
    device: Device,
    desired: Bundle | None,
    pin: common_pb2.VariantPin | None = None,
    desired_models: Sequence[crud.Release] = (),
) -> common_pb2.DeviceSummary:
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
        labels=listed_labels(device.labels),
        variant=device.variant,
        revoked=device.revoked_at is not None,
        selection_reason=device.selection_reason,
        desired_models=[common_pb2.BundleRef(name=name, version=version) for name, version in desired_models],
        models=installed_models(device),
    )
    if pin is not None:
        summary.pin.CopyFrom(pin)
    if device.active_bundle:
        summary.active_bundle.CopyFrom(
            common_pb2.BundleRef(name=device.active_bundle, version=device.active_version)
        )
    if desired is not None:
        summary.desired_bundle.CopyFrom(common_pb2.BundleRef(name=desired.name, version=desired.version))
    if device.last_seen is not None:
        summary.last_seen.CopyFrom(timestamp(device.last_seen))
    summary.online = device.online
    if device.presence_at is not None:
        summary.presence_at.CopyFrom(timestamp(device.presence_at))
    return summary


@guarded(operator_pb2.DESCRIPTOR.services_by_name["OperatorService"])
class OperatorService(operator_pb2_grpc.OperatorServiceServicer):
    def __init__(
        self,
        *,
        db: Database,
        blobs: BlobStore,
        notifier: DesiredStateNotifier,
        repositories: Repositories,
        on_device_revoked: Callable[[str], Awaitable[None]] | None = None,
        rollout_config: EngineConfig | None = None,
        rate_limit: RateLimit | None = None,
    ) -> None:
        self.guard = CallGuard(db=db, rate_limit=rate_limit)
        self.db = db
        self.blobs = blobs
        self.notifier = notifier
        self.repositories = repositories
        self.on_device_revoked = on_device_revoked  # e.g. re-issue the CRL and cut the broker session
        self.rollouts = RolloutRpcs(
            db=db,
            notifier=notifier,
            machine=RolloutMachine(repositories, rollout_config or EngineConfig()),
            refuse=self._refuse,
        )

    async def _refuse(
        self,
        context: Context,
        who: OperatorIdentity,
        action: str,
        target: str,
        code: grpc.StatusCode,
        message: str,
    ) -> NoReturn:
        """Fails the call with ``code``; the guard records the refusal under ``who`` as ``action``."""
        raise Refused(code, message, action=action, target=target)

    def _assign(self, session: Session, changed: Sequence[crud.DeployedTo]) -> None:
        """Signs each changed device's director targets: all of its models, its pin, its config."""
        director.sign_changed(session, self.repositories, changed)

    async def PushBundle(
        self,
        request_iterator: AsyncIterator[operator_pb2.PushBundleRequest],
        context: Context,
    ) -> operator_pb2.PushBundleResponse:
        who = await authorize(self.db, context, Role.OPERATOR)
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
        pushed = f"{upload.release.name}@{upload.release.version}" if upload.release else "?"
        if refusal is not None:
            await self._refuse(context, who, "bundle.push", pushed, refusal.code, refusal.message)
        image_targets = upload.image_targets
        rel = verified

        def publish(session: Session) -> bool:
            _, present = crud.add_bundle(session, release=rel)
            if not present:
                self.repositories.publish_image_targets(session, image_targets, release=rel)
                audit.record(
                    session,
                    actor=who.actor,
                    action="bundle.push",
                    target=pushed,
                    detail={"artifacts": {p: a.sha256 for p, a in rel.artifacts.items()}},
                )
            return present

        try:
            present = await self.db.run(publish)
        except crud.BundleExists as exc:
            await self._refuse(context, who, "bundle.push", pushed, grpc.StatusCode.ALREADY_EXISTS, str(exc))
        except RepositoryRefusal as exc:
            await self._refuse(
                context, who, "bundle.push", pushed, grpc.StatusCode.FAILED_PRECONDITION, str(exc)
            )
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
        if key is not None and not (
            isinstance(key, list) and len(key) == 2 and isinstance(key[0], str) and isinstance(key[1], int)
        ):
            raise pages.InvalidPageToken("page_token is not one this method issued")
        after = (key[0], key[1]) if isinstance(key, list) else None

        def query(session: Session) -> pages.Page[operator_pb2.BundleInfo]:
            rows = crud.list_bundles(session, after=after, limit=size + 1)  # type: ignore[arg-type]
            return pages.cut(
                BUNDLES, rows, size=size, encode=_bundle_info, key=lambda b: [b.name, b.version], filters={}
            )

        page = await self.db.run(query)
        return operator_pb2.ListBundlesResponse(bundles=page.items, next_page_token=page.next_page_token)

    async def CreateToken(
        self, request: operator_pb2.CreateTokenRequest, context: Context
    ) -> operator_pb2.CreateTokenResponse:
        who = await authorize(self.db, context, Role.ADMIN)
        uses = request.uses or 1
        if uses > MAX_TOKEN_USES:
            raise invalid(f"uses must be at most {MAX_TOKEN_USES}")
        try:
            crud.check_labels(request.labels)
        except crud.InvalidLabels as exc:
            raise invalid(str(exc)) from exc
        ttl = timedelta(seconds=request.ttl_seconds) if request.ttl_seconds else DEFAULT_TOKEN_TTL
        token = new_secret()
        digest = secret_sha256(token)

        def create(session: Session) -> EnrollmentToken:
            row = crud.create_token(
                session, token_sha256=digest, uses=uses, ttl=ttl, labels=dict(request.labels)
            )
            audit.record(
                session,
                actor=who.actor,
                action="token.create",
                target=f"token:{digest[:12]}",
                detail={
                    "uses": uses,
                    "ttl_seconds": int(ttl.total_seconds()),
                    "labels": dict(request.labels),
                },
            )
            return row

        row = await self.db.run(create)
        return operator_pb2.CreateTokenResponse(token=token, expires=timestamp(row.expires_at), uses=uses)

    async def Deploy(
        self, request: operator_pb2.DeployRequest, context: Context
    ) -> operator_pb2.DeployResponse:
        """Adds a release to devices' models (replacing the release of the same name); each
        device's director targets are re-signed listing every model it now holds."""
        who = await authorize(self.db, context, Role.OPERATOR)
        ref = f"{request.bundle.name}@{request.bundle.version}"
        if request.all_devices == bool(request.device_ids):
            raise invalid("give either all_devices or device_ids")

        def deploy(session: Session) -> list[crud.DeployedTo]:
            bundle = crud.get_bundle(session, name=request.bundle.name, version=request.bundle.version)
            assert bundle is not None
            ids = None if request.all_devices else list(request.device_ids)
            deployed = crud.deploy(session, bundle=bundle, device_ids=ids)
            self._assign(session, deployed)
            audit.record(
                session,
                actor=who.actor,
                action="deploy",
                target=ref,
                detail={"count": len(deployed), "devices": {d.device_id: d.generation for d in deployed}},
            )
            return deployed

        try:
            deployed = await self.db.run(deploy)
        except (crud.BundleNotFound, crud.DeviceNotFound) as exc:
            await self._refuse(context, who, "deploy", ref, grpc.StatusCode.NOT_FOUND, str(exc))
        except RepositoryRefusal as exc:
            await self._refuse(context, who, "deploy", ref, grpc.StatusCode.FAILED_PRECONDITION, str(exc))
        self.notifier.notify([d.device_id for d in deployed])
        return operator_pb2.DeployResponse(
            device_ids=[d.device_id for d in deployed],
            max_generation=max((d.generation for d in deployed), default=0),
        )

    async def Undeploy(
        self, request: operator_pb2.UndeployRequest, context: Context
    ) -> operator_pb2.UndeployResponse:
        """Removes a model from devices: each device that held it gets director targets listing
        its remaining models (none at all is a valid assignment) and a nudge to apply them."""
        who = await authorize(self.db, context, Role.OPERATOR)
        if not request.name or len(request.name) > MAX_NAME_CHARS:
            raise invalid(f"name is required, at most {MAX_NAME_CHARS} characters")
        if request.all_devices == bool(request.device_ids):
            raise invalid("give either all_devices or device_ids")

        def undeploy(session: Session) -> list[crud.DeployedTo]:
            ids = None if request.all_devices else list(request.device_ids)
            changed = crud.undeploy(session, name=request.name, device_ids=ids)
            self._assign(session, changed)
            audit.record(
                session,
                actor=who.actor,
                action="undeploy",
                target=request.name,
                detail={"devices": {d.device_id: d.generation for d in changed}},
            )
            return changed

        try:
            changed = await self.db.run(undeploy)
        except crud.DeviceNotFound as exc:
            await self._refuse(context, who, "undeploy", request.name, grpc.StatusCode.NOT_FOUND, str(exc))
        except RepositoryRefusal as exc:
            await self._refuse(
                context, who, "undeploy", request.name, grpc.StatusCode.FAILED_PRECONDITION, str(exc)
            )
        self.notifier.notify([d.device_id for d in changed])
        return operator_pb2.UndeployResponse(
            device_ids=[d.device_id for d in changed],
            max_generation=max((d.generation for d in changed), default=0),
        )

    async def ListDevices(
        self, request: operator_pb2.ListDevicesRequest, context: Context
    ) -> operator_pb2.ListDevicesResponse:
        """A page of devices in enrollment order (``pages``)."""
        await authorize(self.db, context, Role.VIEWER)
        size = DEVICES.size(request.page_size)
        after = pages.str_key(pages.decode_token(DEVICES, request.page_token, {}))

        def summaries(session: Session) -> pages.Page[common_pb2.DeviceSummary]:
            devices = crud.list_devices(session, after=after, limit=size + 1)
            pins = crud.list_pins(session)
            assigned = crud.assigned_models(session, device_ids=[d.id for d in devices])

            def summary(d: Device) -> common_pb2.DeviceSummary:
                desired = session.get(Bundle, d.desired_bundle_id) if d.desired_bundle_id else None
                return device_summary(
                    d, desired, pin_message(crud.effective_pin(pins, d)), assigned.get(d.id, ())
                )

            return pages.cut(DEVICES, devices, size=size, encode=summary, key=lambda d: d.id, filters={})

        page = await self.db.run(summaries)
        return operator_pb2.ListDevicesResponse(devices=page.items, next_page_token=page.next_page_token)

    async def QueryTelemetry(
        self, request: operator_pb2.QueryTelemetryRequest, context: Context
    ) -> operator_pb2.QueryTelemetryResponse:
        """A page of stored rows, newest first; ``limit`` is the page size of older callers."""
        await authorize(self.db, context, Role.VIEWER)
        size = TELEMETRY.size(request.page_size or request.limit)
        filters = {"device_id": request.device_id, "kind": request.kind}
        before = pages.int_key(pages.decode_token(TELEMETRY, request.page_token, filters))

        def query(session: Session) -> pages.Page[operator_pb2.TelemetryRow]:
            rows = crud.query_telemetry(
                session,
                device_id=request.device_id or None,
                kind=request.kind or None,
                limit=size + 1,
                before=before,
            )
            return pages.cut(
                TELEMETRY, rows, size=size, encode=_telemetry_row, key=lambda r: r.id or 0, filters=filters
            )

        page = await self.db.run(query)
        return operator_pb2.QueryTelemetryResponse(rows=page.items, next_page_token=page.next_page_token)

    async def TailTelemetry(
        self, request: operator_pb2.TailTelemetryRequest, context: Context
    ) -> AsyncIterator[operator_pb2.TelemetryRow]:
        """Sends the ``backlog`` newest matching rows, then every matching row stored after the
        call began, in id order, until the caller cancels.

        Why polling the table (every TAIL_POLL_SECONDS, one indexed range query on the primary
        key) rather than a hook in the ingestor: rows are written by the ingestor's own thread
        and, with several control-plane replicas behind a shared subscription, by other
        processes; the database is the one place that sees them all, and SQLite has no
        LISTEN/NOTIFY. Ids grow with every insert, so "id greater than the last sent" neither
        repeats nor skips a row written by one ingestor; a row another replica commits after a
        higher id was already sent can be missed (``fleetctl telemetry query`` is the record).
        """
        await authorize(self.db, context, Role.VIEWER)
        kinds = {k.value for k in TopicKind}
        if request.kind and request.kind not in kinds:
            raise invalid(f"kind must be one of {', '.join(sorted(kinds))}")
        device_id, kind = request.device_id or None, request.kind or None
        backlog = min(request.backlog, MAX_TELEMETRY_ROWS)
        last_id, rows = await self.db.run(
            lambda s: _tail_start(s, device_id=device_id, kind=kind, backlog=backlog)
        )
        for row in rows:
            yield _telemetry_row(row)
        while True:
            rows = await self.db.run(partial(_tail_after, after=last_id, device_id=device_id, kind=kind))
            for row in rows:
                yield _telemetry_row(row)
            if rows:
                last_id = rows[-1].id or last_id
            if len(rows) < TAIL_BATCH_ROWS:  # a full batch means more are waiting: no pause
                await asyncio.sleep(TAIL_POLL_SECONDS)

    async def GetImageTargets(
        self, request: operator_pb2.GetImageTargetsRequest, context: Context
    ) -> operator_pb2.GetImageTargetsResponse:
        await authorize(self.db, context, Role.VIEWER)
        data = await self.db.run(self.repositories.image_targets)
        return operator_pb2.GetImageTargetsResponse(targets=data or b"")

    async def PushRoot(
        self, request: operator_pb2.PushRootRequest, context: Context
    ) -> operator_pb2.PushRootResponse:
        who = await authorize(self.db, context, Role.ADMIN)
        if request.repository not in (IMAGE, DIRECTOR):
            raise invalid("repository must be 'image' or 'director'")
        try:

            def push(session: Session) -> int:
                version = self.repositories.push_root(session, request.repository, request.root)
                audit.record(
                    session, actor=who.actor, action="root.push", target=f"{request.repository}:{version}"
                )
                return version

            version = await self.db.run(push)
        except (RepositoryRefusal, KeyStoreError) as exc:
            await self._refuse(
                context, who, "root.push", request.repository, grpc.StatusCode.FAILED_PRECONDITION, str(exc)
            )
        return operator_pb2.PushRootResponse(version=version)

    async def ListAudit(
        self, request: operator_pb2.ListAuditRequest, context: Context
    ) -> operator_pb2.ListAuditResponse:
        """A page of matching entries, newest first; ``limit`` is the page size of older callers."""
        await authorize(self.db, context, Role.VIEWER)
        try:
            since = request.since.ToDatetime(tzinfo=UTC) if request.HasField("since") else None
        except (ValueError, OverflowError) as exc:
            raise invalid(f"since is not a time: {exc}") from exc
        size = AUDIT.size(request.page_size or request.limit)
        filters = {
            "actor": request.actor,
            "action": request.action,
            "target": request.target,
            "since": since.isoformat() if since else "",
        }
        before = pages.int_key(pages.decode_token(AUDIT, request.page_token, filters))

        def query(session: Session) -> pages.Page[operator_pb2.AuditRecord]:
            rows = audit.list_entries(
                session,
                actor=request.actor or None,
                action=request.action or None,
                target=request.target or None,
                since=since,
                limit=size + 1,
                before=before,
            )
            return pages.cut(
                AUDIT, rows, size=size, encode=_audit_record, key=lambda r: r.seq, filters=filters
            )

        page = await self.db.run(query)
        return operator_pb2.ListAuditResponse(entries=page.items, next_page_token=page.next_page_token)

    async def VerifyAudit(
        self, request: operator_pb2.VerifyAuditRequest, context: Context
    ) -> operator_pb2.VerifyAuditResponse:
        await authorize(self.db, context, Role.VIEWER)
        result = await self.db.run(audit.verify)
        return operator_pb2.VerifyAuditResponse(
            ok=result.ok,
            entries=result.entries,
            head=result.head,
            broken_at=result.broken_at or 0,
            reason=result.reason,
        )

    async def CreateOperator(
        self, request: operator_pb2.CreateOperatorRequest, context: Context
    ) -> operator_pb2.CreateOperatorResponse:
        who = await authorize(self.db, context, Role.ADMIN)
        try:
            role = Role.parse(request.role[:32])
        except ValueError as exc:
            raise invalid(str(exc)) from exc

        def create(session: Session) -> str:
            token = create_operator(session, name=request.name, role=role)
            audit.record(
                session,
                actor=who.actor,
                action="operator.create",
                target=request.name,
                detail={"role": role.name.lower()},
            )
            return token

        try:
            token = await self.db.run(create)
        except ValueError as exc:
            await self._refuse(
                context, who, "operator.create", request.name, grpc.StatusCode.INVALID_ARGUMENT, str(exc)
            )
        except OperatorExists as exc:
            await self._refuse(
                context, who, "operator.create", request.name, grpc.StatusCode.ALREADY_EXISTS, str(exc)
            )
        return operator_pb2.CreateOperatorResponse(token=token)

    async def ListOperators(
        self, request: operator_pb2.ListOperatorsRequest, context: Context
    ) -> operator_pb2.ListOperatorsResponse:
        """A page of operators by name."""
        await authorize(self.db, context, Role.ADMIN)
        size = OPERATORS.size(request.page_size)
        after = pages.str_key(pages.decode_token(OPERATORS, request.page_token, {}))

        def query(session: Session) -> pages.Page[operator_pb2.OperatorInfo]:
            rows = list_operators(session, after=after, limit=size + 1)
            return pages.cut(
                OPERATORS, rows, size=size, encode=_operator_info, key=lambda r: r.name, filters={}
            )

        page = await self.db.run(query)
        return operator_pb2.ListOperatorsResponse(operators=page.items, next_page_token=page.next_page_token)

    async def RevokeOperator(
        self, request: operator_pb2.RevokeOperatorRequest, context: Context
    ) -> operator_pb2.RevokeOperatorResponse:
        who = await authorize(self.db, context, Role.ADMIN)

        def revoke(session: Session) -> bool:
            done = revoke_operator(session, name=request.name)
            audit.record(
                session,
                actor=who.actor,
                action="operator.revoke",
                target=request.name,
                outcome=Outcome.OK if done else Outcome.REFUSED,
            )
            return done

        return operator_pb2.RevokeOperatorResponse(revoked=await self.db.run(revoke))

    async def PublishImageTargets(
        self, request: operator_pb2.PublishImageTargetsRequest, context: Context
    ) -> operator_pb2.PublishImageTargetsResponse:
        who = await authorize(self.db, context, Role.ADMIN)

        def publish(session: Session) -> int:
            version = self.repositories.publish_image_targets(session, request.targets, release=None)
            audit.record(session, actor=who.actor, action="image.resign", target=f"image-targets:{version}")
            return version

        try:
            version = await self.db.run(publish)
        except RepositoryRefusal as exc:
            await self._refuse(
                context, who, "image.resign", "image-targets", grpc.StatusCode.FAILED_PRECONDITION, str(exc)
            )
        return operator_pb2.PublishImageTargetsResponse(version=version)

    async def RevokeDevice(
        self, request: operator_pb2.RevokeDeviceRequest, context: Context
    ) -> operator_pb2.RevokeDeviceResponse:
        who = await authorize(self.db, context, Role.OPERATOR)

        def revoke(session: Session) -> bool:
            device = session.get(Device, request.device_id)
            if device is None:
                raise crud.DeviceNotFound(f"unknown device {clip(request.device_id, 64)}")
            if device.revoked_at is not None:
                return False
            device.revoked_at = utcnow()
            session.add(device)
            certificates = crud.revoke_certificates(session, device_id=device.id, when=device.revoked_at)
            audit.record(
                session,
                actor=who.actor,
                action="device.revoke",
                target=device.id,
                detail={"certificates": certificates},
            )
            return True

        try:
            revoked = await self.db.run(revoke)
        except crud.DeviceNotFound as exc:
            await self._refuse(
                context, who, "device.revoke", request.device_id, grpc.StatusCode.NOT_FOUND, str(exc)
            )
        self.notifier.notify([request.device_id])  # its open stream re-checks and ends
        if revoked and self.on_device_revoked is not None:
            await self.on_device_revoked(request.device_id)
        return operator_pb2.RevokeDeviceResponse(revoked=revoked)

    async def SetVariantPin(
        self, request: operator_pb2.SetVariantPinRequest, context: Context
    ) -> operator_pb2.SetVariantPinResponse:
        """Pins travel in signed director targets: every device whose pin in force changed is
        re-assigned its release at a new generation, and so chooses its variant again."""
        who = await authorize(self.db, context, Role.OPERATOR)
        selector = dict(request.selector)
        action = "pin.clear" if request.clear else "pin.set"
        target = (
            f"device:{request.device_id}" if request.device_id else f"labels:{crud.selector_text(selector)}"
        )

        def pin(session: Session) -> crud.PinChange:
            change = crud.set_pin(
                session,
                device_id=request.device_id or None,
                selector=selector,
                variant_id="" if request.clear else request.variant_id,
                fmt=0 if request.clear else request.format,
                clear=request.clear,
                actor=who.actor,
            )
            for moved in change.repinned:
                director.sign_repinned(session, self.repositories, moved)
            detail: dict[str, object] = {
                "changed": change.changed,
                "devices": {m.device_id: m.generation for m in change.repinned},
            }
            if not request.clear:
                detail["variant"] = request.variant_id or None
                detail["runtime"] = common_pb2.ModelFormat.Name(request.format) if request.format else None
            audit.record(session, actor=who.actor, action=action, target=target, detail=detail)
            return change

        try:
            change = await self.db.run(pin)
        except crud.InvalidPin as exc:
            await self._refuse(context, who, action, target, grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except crud.DeviceNotFound as exc:
            await self._refuse(context, who, action, target, grpc.StatusCode.NOT_FOUND, str(exc))
        except RepositoryRefusal as exc:
            await self._refuse(context, who, action, target, grpc.StatusCode.FAILED_PRECONDITION, str(exc))
        ids = [m.device_id for m in change.repinned]
        self.notifier.notify(ids)
        return operator_pb2.SetVariantPinResponse(
            device_ids=ids,
            max_generation=max((m.generation for m in change.repinned), default=0),
            changed=change.changed,
        )

    async def SetDeviceLabels(
        self, request: operator_pb2.SetDeviceLabelsRequest, context: Context
    ) -> operator_pb2.SetDeviceLabelsResponse:
        """Labels select devices for rollouts and group pins; a change that moves the device into
        or out of a group pin re-signs its director targets with the pin now in force."""
        who = await authorize(self.db, context, Role.OPERATOR)
        if not request.device_id:
            raise invalid("device_id is required")

        def label(session: Session) -> crud.LabelChange:
            change = crud.set_labels(
                session, device_id=request.device_id, set_=dict(request.set), remove=list(request.remove)
            )
            moved = change.repinned
            if moved is not None:
                director.sign_repinned(session, self.repositories, moved)
            audit.record(
                session,
                actor=who.actor,
                action="device.labels",
                target=request.device_id,
                detail={
                    "set": dict(request.set),
                    "remove": list(request.remove),
                    "labels": change.labels,
                    "generation": moved.generation if moved else None,
                },
            )
            return change

        try:
            change = await self.db.run(label)
        except crud.InvalidLabels as exc:
            await self._refuse(
                context, who, "device.labels", request.device_id, grpc.StatusCode.INVALID_ARGUMENT, str(exc)
            )
        except crud.DeviceNotFound as exc:
            await self._refuse(
                context, who, "device.labels", request.device_id, grpc.StatusCode.NOT_FOUND, str(exc)
            )
        except RepositoryRefusal as exc:
            await self._refuse(
                context,
                who,
                "device.labels",
                request.device_id,
                grpc.StatusCode.FAILED_PRECONDITION,
                str(exc),
            )
        if change.repinned is not None:
            self.notifier.notify([request.device_id])
        return operator_pb2.SetDeviceLabelsResponse(labels=change.labels)

    # -- rollouts (controlplane/api/rollouts.py) ---------------------------------------------

    async def CreateRollout(
        self, request: operator_pb2.CreateRolloutRequest, context: Context
    ) -> operator_pb2.Rollout:
        return await self.rollouts.create(request, context)

    async def GetRollout(
        self, request: operator_pb2.GetRolloutRequest, context: Context
    ) -> operator_pb2.Rollout:
        return await self.rollouts.get(request, context)

    async def ListRollouts(
        self, request: operator_pb2.ListRolloutsRequest, context: Context
    ) -> operator_pb2.ListRolloutsResponse:
        return await self.rollouts.list(request, context)

    async def ControlRollout(
        self, request: operator_pb2.ControlRolloutRequest, context: Context
    ) -> operator_pb2.Rollout:
        return await self.rollouts.control(request, context)


# -- telemetry rows and TailTelemetry's queries -------------------------------------------------


def _telemetry_row(r: TelemetryRecord) -> operator_pb2.TelemetryRow:
    """One stored record as a row; a payload over MAX_PAYLOAD_CHARS of JSON is left out and
    flagged, so whatever was stored, every row fits in a reply."""
    payload = json.dumps(r.payload, sort_keys=True)
    row = operator_pb2.TelemetryRow(
        device_id=r.device_id, kind=r.kind, seq=r.seq, time=timestamp(r.time), payload_json=payload
    )
    if len(payload) > MAX_PAYLOAD_CHARS:
        row.payload_json, row.payload_truncated, row.payload_bytes = "{}", True, len(payload.encode())
    return row


def _audit_record(r: AuditEntry) -> operator_pb2.AuditRecord:
    """One entry as listed; a detail over MAX_DETAIL_BYTES of JSON (written before entries were
    bounded) is cut to that and flagged."""
    detail = json.dumps(r.detail, sort_keys=True)
    record = operator_pb2.AuditRecord(
        seq=r.seq,
        time=timestamp(r.time),
        actor=r.actor,
        action=r.action,
        target=r.target,
        outcome=r.outcome,
        detail_json=detail,
        hash=r.hash,
    )
    if len(detail) > MAX_DETAIL_BYTES:
        record.detail_json, record.detail_truncated = detail[:MAX_DETAIL_BYTES], True
    return record


def _bundle_info(b: Bundle) -> operator_pb2.BundleInfo:
    return operator_pb2.BundleInfo(
        manifest=json_format.ParseDict(
            json.loads(b.manifest_json), bundle_pb2.BundleManifest(), ignore_unknown_fields=True
        ),
        created=timestamp(b.created_at),
        expires=timestamp(b.expires_at),
        total_bytes=b.total_bytes,
    )


def _operator_info(r: OperatorToken) -> operator_pb2.OperatorInfo:
    return operator_pb2.OperatorInfo(
        name=r.name, role=r.role, created=timestamp(r.created_at), revoked=r.revoked_at is not None
    )


def _matching(query: Any, *, device_id: str | None, kind: str | None) -> Any:
    if device_id:
        query = query.where(TelemetryRecord.device_id == device_id)
    if kind:
        query = query.where(TelemetryRecord.kind == kind)
    return query


def _tail_start(
    session: Session, *, device_id: str | None, kind: str | None, backlog: int
) -> tuple[int, list[TelemetryRecord]]:
    """The id of the newest stored row (of any device and kind: where the tail starts) and the
    ``backlog`` newest matching rows up to it, oldest first."""
    newest = session.exec(select(func.max(TelemetryRecord.id))).one() or 0
    if not backlog:
        return newest, []
    query = _matching(
        select(TelemetryRecord).where(col(TelemetryRecord.id) <= newest), device_id=device_id, kind=kind
    )
    rows = session.exec(query.order_by(col(TelemetryRecord.id).desc()).limit(backlog)).all()
    return newest, list(reversed(rows))


def _tail_after(
    session: Session, *, after: int, device_id: str | None, kind: str | None
) -> list[TelemetryRecord]:
    """Up to TAIL_BATCH_ROWS matching rows stored after row ``after``, in id order."""
    query = _matching(
        select(TelemetryRecord).where(col(TelemetryRecord.id) > after), device_id=device_id, kind=kind
    )
    return list(session.exec(query.order_by(col(TelemetryRecord.id)).limit(TAIL_BATCH_ROWS)).all())
