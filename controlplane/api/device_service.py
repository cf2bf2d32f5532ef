"""DeviceService: enrollment and certificate renewal, desired-state stream, status reports,
artifact and metadata download."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

from sqlmodel import Session

from edgefleet.controlplane.api.auth import (
    Context,
    authenticate_device,
    calling_device,
    device_certificate,
    device_holding,
    new_device_id,
)
from edgefleet.controlplane.api.guard import CallGuard, guarded
from edgefleet.controlplane.api.ratelimit import RateLimit
from edgefleet.controlplane.api.refusals import (
    InvalidRequest,
    NotFound,
    NotPermitted,
    OutOfRange,
    Refusal,
    Unauthenticated,
)
from edgefleet.controlplane.fleet import audit
from edgefleet.controlplane.fleet.audit import Outcome
from edgefleet.controlplane.fleet.changes import ChangeFeed, change_feed
from edgefleet.controlplane.fleet.desired_state import desired_states
from edgefleet.controlplane.fleet.notifier import BatchRead, DesiredStateNotifier, wait_event
from edgefleet.controlplane.fleet.rbac import secret_sha256
from edgefleet.controlplane.rollouts import store as rollout_store
from edgefleet.controlplane.store import access, deployments, devices
from edgefleet.controlplane.store.blobs import BlobNotFound, BlobStore, InvalidDigest
from edgefleet.controlplane.store.database import Database
from edgefleet.controlplane.store.errors import TokenRejected
from edgefleet.controlplane.store.models import Device, utcnow
from edgefleet.controlplane.store.write_batch import WriteBatch
from edgefleet.controlplane.trust.ca import (
    CertificateAuthority,
    CertificateError,
    IssuedCertificate,
    csr_key_sha256,
)
from edgefleet.controlplane.trust.repositories import Repositories
from edgefleet.protos.fleet import selectors, topics
from edgefleet.protos.fleet.uptane import DIRECTOR, IMAGE
from edgefleet.protos.fleet.v1 import common_pb2, device_pb2, device_pb2_grpc

log = logging.getLogger(__name__)
MAX_HOSTNAME = 255
MAX_REPORTED_TEXT = 2000
# A name python-tuf asks for; anything else cannot exist (and a version past int64 would not
# fit the column it is looked up in).
METADATA_FILE_NAME = re.compile(r"(?:[1-9][0-9]{0,17}\.)?[a-z]{1,16}\.json")


class Revoked(Exception):
    """The device was revoked (or removed) while its stream was open."""


MAX_REPORTED_MODELS = 64


def reported_models(report: device_pb2.StatusReport) -> list[dict[str, Any]]:
    """The installed models of a status report as stored on the device row (bounded: the
    report is the device's word, and a listing must not grow without limit)."""
    return [
        {
            "name": m.bundle.name[:128],
            "version": m.bundle.version,
            "variant": m.variant[:128],
            "loaded": m.loaded,
        }
        for m in report.models[:MAX_REPORTED_MODELS]
    ]


IN_PROGRESS = frozenset(
    {
        common_pb2.DEVICE_STATE_VERIFYING,
        common_pb2.DEVICE_STATE_FETCHING,
        common_pb2.DEVICE_STATE_INSTALLING,
        common_pb2.DEVICE_STATE_TESTING,
    }
)


# States in which a report's generation has been applied: serving it, or, once its last model
# was undeployed, holding nothing by design.
APPLIED = frozenset({common_pb2.DEVICE_STATE_ACTIVE, common_pb2.DEVICE_STATE_IDLE})


def lifecycle_event(before: Device, report: device_pb2.StatusReport) -> str | None:
    """The audit action a status report amounts to, if it is a lifecycle step."""
    if report.state == common_pb2.DEVICE_STATE_ACTIVE and report.generation > before.applied_generation:
        return "deployment.installed"
    if report.state == before.state:
        return None
    if report.state == common_pb2.DEVICE_STATE_FAILED:
        return "deployment.refused"
    if report.state == common_pb2.DEVICE_STATE_ROLLED_BACK:
        return "deployment.rolled_back"
    if report.state in IN_PROGRESS and before.state not in IN_PROGRESS:
        return "deployment.accepted"
    return None


def enroll_refused(message: str, *, kind: type[Refusal] = InvalidRequest, target: str = "") -> Refusal:
    """An enrollment refusal, a stranger's: audited as device.enroll by device:unenrolled."""
    return kind(message, action="device.enroll", actor="device:unenrolled", target=target)


REPOSITORY_NAMES = {device_pb2.REPOSITORY_IMAGE: IMAGE, device_pb2.REPOSITORY_DIRECTOR: DIRECTOR}


@guarded(device_pb2.DESCRIPTOR.services_by_name["DeviceService"])
class DeviceService(device_pb2_grpc.DeviceServiceServicer):
    def __init__(
        self,
        *,
        db: Database,
        blobs: BlobStore,
        notifier: DesiredStateNotifier,
        chunk_size: int,
        recheck_seconds: float,
        mqtt_url: str,
        repositories: Repositories,
        ca: CertificateAuthority,
        device_cert_validity: timedelta,
        device_endpoint: str,
        rate_limit: RateLimit | None = None,
    ) -> None:
        self.guard = CallGuard(db=db, rate_limit=rate_limit)
        self.mqtt_url = mqtt_url
        self.ca = ca
        self.device_cert_validity = device_cert_validity
        self.device_endpoint = device_endpoint
        self.repositories = repositories
        self.db = db
        self.blobs = blobs
        self.notifier = notifier
        self.chunk_size = chunk_size
        self.recheck_seconds = recheck_seconds
        self.feed: ChangeFeed | None = None  # while changes() runs
        # Every woken stream of this replica reads its state through here: one read-only
        # query for all the streams a change woke, not a transaction each.
        self.desired: BatchRead[str, device_pb2.DesiredState] = BatchRead(self._read_desired)
        # Status reports share transactions (a savepoint each): after a deploy every device
        # reports twice within seconds, which as a transaction each queue for the write lock.
        self.reports = WriteBatch(db)
        # Enrollments likewise: a fleet enrolling at once shares commits (a refused one rolls
        # back its own savepoint: its token unspent, no device behind).
        self.enrollments = WriteBatch(db)

    async def _read_desired(self, device_ids: list[str]) -> dict[str, device_pb2.DesiredState]:
        return await self.db.read(lambda s: desired_states(s, device_ids))

    async def Enroll(self, request: device_pb2.EnrollRequest, context: Context) -> device_pb2.EnrollResponse:
        """Every refusal here is a stranger's: audited once per peer and reason a window (the
        guard's RefusalLog), and it spends a token of the peer's rate-limit bucket."""
        token_digest = secret_sha256(request.bootstrap_token)
        if not request.bootstrap_token:
            raise enroll_refused("bootstrap_token is required")
        if not request.csr:
            raise enroll_refused("csr is required")
        try:
            selectors.check_labels(request.labels)
            binding = secret_sha256(f"{token_digest}:{csr_key_sha256(request.csr)}")
        except selectors.InvalidLabels as exc:
            raise enroll_refused(str(exc)) from exc
        except CertificateError as exc:
            raise enroll_refused(f"csr refused: {exc}") from exc
        hostname = request.hostname[:MAX_HOSTNAME]

        def enroll(session: Session) -> tuple[str, IssuedCertificate]:
            # One transaction: a refused CSR leaves the token unspent and no device behind.
            earlier = devices.device_enrolled_as(session, enrollment_sha256=binding)
            if earlier is not None:
                # The same token and key again: the device never got our answer. Same identity,
                # a fresh certificate; the token is not spent twice.
                issued = self._issue(session, earlier.id, request.csr)
                audit.record(
                    session,
                    actor=f"device:{earlier.id}",
                    action="device.enroll",
                    target=earlier.id,
                    detail={"repeated": True, "certificate": format(issued.serial, "x")},
                )
                return earlier.id, issued
            device_id = new_device_id()
            token = access.consume_token(session, token_sha256=token_digest)
            labels = {**dict(request.labels), **token.labels}
            selectors.check_labels(labels, what="label (the device's and its token's together)")
            devices.create_device(
                session,
                device_id=device_id,
                hostname=hostname,
                labels=labels,
                enrollment_sha256=binding,
            )
            issued = self._issue(session, device_id, request.csr)
            audit.record(
                session,
                actor=f"device:{device_id}",
                action="device.enroll",
                target=device_id,
                detail={
                    "hostname": hostname,
                    "labels": labels,
                    "token": token_digest[:12],
                    "certificate": format(issued.serial, "x"),
                },
            )
            return device_id, issued

        try:
            device_id, issued = await self.enrollments.run(enroll)
        except CertificateError as exc:
            raise enroll_refused(f"csr refused: {exc}") from exc
        except selectors.InvalidLabels as exc:
            raise enroll_refused(str(exc)) from exc
        except TokenRejected as exc:
            raise enroll_refused(str(exc), kind=NotPermitted, target=f"token:{token_digest[:12]}") from exc
        return device_pb2.EnrollResponse(
            device_id=device_id,
            mqtt_topic_prefix=topics.device_prefix(device_id),
            mqtt_url=self.mqtt_url,
            certificate=issued.certificate_pem,
            device_endpoint=self.device_endpoint,
        )

    def _issue(self, session: Session, device_id: str, csr_pem: bytes) -> IssuedCertificate:
        issued = self.ca.sign_device_csr(csr_pem, device_id=device_id, validity=self.device_cert_validity)
        devices.record_certificate(
            session, device_id=device_id, serial=issued.serial, not_after=issued.not_after
        )
        return issued

    async def RenewCertificate(
        self, request: device_pb2.RenewCertificateRequest, context: Context
    ) -> device_pb2.RenewCertificateResponse:
        device = await authenticate_device(self.db, context)

        def renew(session: Session) -> IssuedCertificate:
            # Re-read in this transaction: a revocation committed since authentication must win,
            # or the new certificate would be live and missing from the broker's CRL.
            current = session.get(Device, device.id)
            if current is None or current.revoked_at is not None:
                raise Revoked(device.id)
            issued = self._issue(session, device.id, request.csr)
            audit.record(
                session,
                actor=f"device:{device.id}",
                action="device.renew",
                target=device.id,
                detail={"certificate": format(issued.serial, "x"), "not_after": issued.not_after.isoformat()},
            )
            return issued

        try:
            issued = await self.db.run(renew)
        except CertificateError as exc:
            raise InvalidRequest(f"csr refused: {exc}", action="device.renew", target=device.id) from exc
        except Revoked as exc:
            raise Unauthenticated(f"device {device.id} was revoked", action="device.renew") from exc
        return device_pb2.RenewCertificateResponse(certificate=issued.certificate_pem)

    async def WatchDesiredState(
        self, request: device_pb2.WatchDesiredStateRequest, context: Context
    ) -> AsyncIterator[device_pb2.DesiredState]:
        """Sends the device's desired state, then again whenever it moves. An idle stream costs
        the database nothing: it re-reads only when woken, by a change made here, a notice from
        another replica, or the replica's periodic safety net (``fleet.changes``). The read
        is batched (``self.desired``) with those of the other streams woken with it."""
        device = await authenticate_device(self.db, context)
        with self.notifier.subscribe(device.id) as watch:
            while True:
                watch.event.clear()
                state = await self.desired.read(device.id)
                if state is None:
                    raise Unauthenticated(f"device {device.id} was revoked", charges=False)
                if state.generation > watch.sent:
                    watch.sent = state.generation
                    yield state
                await wait_event(watch.event, None)

    async def GetDesiredState(
        self, request: device_pb2.GetDesiredStateRequest, context: Context
    ) -> device_pb2.DesiredState:
        """The device's desired state, once: what an agent that hears of changes through the
        broker asks when it (re)subscribes and on its slow poll. Batched with the other
        devices' reads (``self.desired``): a fleet polling at once costs one query per batch."""
        device = await authenticate_device(self.db, context)
        state = await self.desired.read(device.id)
        if state is None:
            raise Unauthenticated(f"device {device.id} was revoked", charges=False)
        return state

    @contextlib.asynccontextmanager
    async def changes(self) -> AsyncIterator[ChangeFeed]:
        """Runs the replica's change feed (LISTEN with PostgreSQL) and the safety net
        re-checking all streams every ``recheck_seconds`` (jittered): one registration on the
        server's exit stack. Without it streams wake only on this process's own changes."""
        try:
            async with change_feed(self.db, self.notifier, interval=self.recheck_seconds) as feed:
                self.feed = feed
                try:
                    yield feed
                finally:
                    self.feed = None
        finally:
            # The read threads and the read-only pool close with the server (made again on
            # use, should a late read come).
            await asyncio.to_thread(self.db.dispose)

    async def ReportStatus(self, request: device_pb2.StatusReport, context: Context) -> device_pb2.StatusAck:
        cert = device_certificate(context)
        error = request.error[:MAX_REPORTED_TEXT]

        def apply(session: Session) -> Device:
            # Authenticated in the report's own transaction: no read of its own per report.
            device = device_holding(session, cert)
            # The device row first, then the audit chain's lock: the order a deploy takes them
            # in, or a report and a deploy to the same device deadlock on PostgreSQL.
            row = session.get(Device, device.id, with_for_update=True)
            assert row is not None
            event = lifecycle_event(row, request)
            if event is not None:
                audit.record(
                    session,
                    actor=f"device:{device.id}",
                    action=event,
                    target=f"{request.active_bundle.name}@{request.active_bundle.version}"
                    if event == "deployment.installed"
                    else f"generation:{request.generation}",
                    outcome=Outcome.FAILED if event == "deployment.refused" else Outcome.OK,
                    detail={
                        "generation": request.generation,
                        "error": error,
                        "kind": request.error_kind[:128],
                    },
                )
            row.state = request.state
            row.last_seen = utcnow()
            row.api_url = request.api_url[:512]
            row.variant = request.variant[:128]
            if request.HasField("selection"):
                row.selection_reason = request.selection.reason[:2000]
            row.last_error = error
            # The agent names its latest installed model in every report; none: it holds none.
            row.active_bundle = request.active_bundle.name if request.HasField("active_bundle") else ""
            row.active_version = request.active_bundle.version if request.HasField("active_bundle") else 0
            row.models = reported_models(request)
            if request.state in APPLIED:
                row.applied_generation = max(row.applied_generation, request.generation)
            session.add(row)
            rollout_store.record_device_report(
                session,
                device_id=device.id,
                generation=request.generation,
                state=request.state,
                error=error,
            )
            return device

        calling_device(await self.reports.run(apply))
        return device_pb2.StatusAck()

    async def FetchArtifact(
        self, request: device_pb2.FetchArtifactRequest, context: Context
    ) -> AsyncIterator[device_pb2.ArtifactChunk]:
        device = await authenticate_device(self.db, context)
        digest = request.sha256.lower()
        allowed = await self.db.run(
            lambda s: deployments.artifact_deployed_to(s, device_id=device.id, sha256=digest)
        )
        if not allowed:
            raise NotFound(f"artifact {digest[:64]} is not deployed to this device", action="artifact.fetch")
        try:
            total = self.blobs.size(digest)
        except (BlobNotFound, InvalidDigest) as exc:
            raise NotFound(str(exc), action="artifact.fetch") from exc
        if request.offset > total:
            raise OutOfRange(
                f"offset {request.offset} is past the artifact's {total} bytes",
                action="artifact.fetch",
            )
        # A range (delta transfers fetch the chunks a device lacks) ends where it says; none
        # runs to the end of the artifact.
        end = request.offset + request.length if request.length else total
        if end > total:
            raise OutOfRange(
                f"range {request.offset}+{request.length} is past the artifact's {total} bytes",
                action="artifact.fetch",
            )
        read_size = max(1, min(self.chunk_size, end - request.offset))
        chunks = self.blobs.read(digest, offset=request.offset, chunk_size=read_size)
        offset = request.offset
        while offset < end and (chunk := await asyncio.to_thread(next, chunks, None)) is not None:
            if context.cancelled() or context.done():
                log.info("device %s stopped downloading %s at byte %d", device.id, digest[:12], offset)
                return  # the device went away; it resumes from this offset next time
            chunk = chunk[: end - offset]
            yield device_pb2.ArtifactChunk(offset=offset, data=chunk, total_length=total)
            offset += len(chunk)

    async def FetchMetadata(
        self, request: device_pb2.FetchMetadataRequest, context: Context
    ) -> device_pb2.MetadataFile:
        device = await authenticate_device(self.db, context)
        repo = REPOSITORY_NAMES.get(request.repository)
        if repo is None:
            raise InvalidRequest("repository must be IMAGE or DIRECTOR", action="metadata.fetch")
        name = request.name
        data = (
            await self.db.run(
                lambda s: self.repositories.lookup(s, repo=repo, device_id=device.id, name=name)
            )
            if METADATA_FILE_NAME.fullmatch(name)
            else None
        )
        if data is None:
            # TUF clients probe for the next root version on every refresh: an answer, not a refusal.
            raise NotFound(f"no {repo} metadata {name[:64]!r}", audited=False)
        return device_pb2.MetadataFile(data=data)
