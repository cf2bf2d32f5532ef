"""The agent's conversation with the control plane: enrollment, its certificate, the desired
state it follows and the status it reports.

Every call is retried with jittered exponential backoff while the control plane is away, and
serving never waits for it: the loops here only feed the updater (desired state) and drain the
latest status report. A device whose certificate the control plane refuses raises
``DeviceRevoked``, which stops the agent: nothing it could retry would let it back in.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from datetime import UTC, datetime
from ssl import SSLContext

import grpc
from tenacity import AsyncRetrying, before_sleep_log, retry_if_exception_type, wait_random_exponential

from edgefleet.agent.config import AgentConfig
from edgefleet.agent.device.channel import DeviceLink, open_enrollment_channel
from edgefleet.agent.device.identity import DeviceIdentity, save_identity
from edgefleet.agent.device.tls import (
    CertificateProblem,
    DeviceCertificate,
    csr_pem,
    enrollment_key,
    load_certificate,
    new_key,
    store_certificate,
)
from edgefleet.agent.update.errors import (
    ControlPlaneUnavailable,
    EnrollmentRefused,
    NotEnrolled,
    TransientFailure,
)
from edgefleet.agent.update.latest import Latest
from edgefleet.agent.update.updater import Updater
from edgefleet.agent.update.uptane_client import UptaneVerifier
from edgefleet.protos.fleet.v1 import device_pb2, device_pb2_grpc

log = logging.getLogger(__name__)

STREAM_ESTABLISHED_SECONDS = 10.0
"""A desired-state stream that lived this long counts as a recovered connection."""

RENEWAL_TRANSIENT = (ControlPlaneUnavailable, OSError, CertificateProblem)
"""A full disk or a bad answer must not stop the agent: it retries until the certificate expires."""


class DeviceRevoked(Exception):
    """The control plane no longer accepts this device's certificate."""


def retrying(
    max_wait_seconds: float,
    transient: tuple[type[BaseException], ...] = (ControlPlaneUnavailable,),
    *,
    log_retries: bool = False,
) -> AsyncRetrying:
    """Retries ``transient`` failures (by default: the control plane is unreachable) with
    jittered exponential backoff; ``log_retries`` logs each failure before the wait."""
    return AsyncRetrying(
        retry=retry_if_exception_type(transient),
        wait=wait_random_exponential(multiplier=0.5, max=max_wait_seconds),
        before_sleep=before_sleep_log(log, logging.WARNING) if log_retries else None,
        reraise=True,
    )


def hostname_of(config: AgentConfig) -> str:
    return config.hostname or socket.gethostname()


# -- enrollment and the device certificate ------------------------------------------------------


async def enroll(config: AgentConfig, stub: device_pb2_grpc.DeviceServiceStub) -> DeviceIdentity:
    """Trades the bootstrap token and a CSR for a device id and certificate, and persists both.

    The key is made here and stays here; the certificate is stored before the identity, so an
    identity on disk always has its certificate beside it.
    """
    if not config.token:
        raise NotEnrolled(f"no identity in {config.state_dir} and no --token to enroll with")
    key = enrollment_key(config.enrollment_key_path)
    try:
        response = await stub.Enroll(
            device_pb2.EnrollRequest(
                bootstrap_token=config.token,
                hostname=hostname_of(config),
                csr=csr_pem(key, hostname_of(config)),
            )
        )
    except grpc.aio.AioRpcError as exc:
        if exc.code() in (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.INVALID_ARGUMENT):
            raise EnrollmentRefused(exc.details() or "enrollment refused") from exc
        raise ControlPlaneUnavailable(f"enrollment failed: {exc.code().name}: {exc.details()}") from exc
    store_certificate(config.certificate_path, key, response.certificate)
    identity = DeviceIdentity(
        device_id=response.device_id,
        mqtt_url=response.mqtt_url,
        controlplane=config.controlplane,
        device_endpoint=response.device_endpoint,
    )
    save_identity(config.identity_path, identity)
    config.enrollment_key_path.unlink(missing_ok=True)  # the key lives on in device.pem
    log.info("enrolled as %s", identity.device_id)
    return identity


async def enroll_with_retry(config: AgentConfig, ca_pem: bytes) -> DeviceIdentity:
    """Enrolls, retrying while the control plane is unreachable (a refusal is final)."""
    async with open_enrollment_channel(config.controlplane, ca_pem) as channel:
        stub = device_pb2_grpc.DeviceServiceStub(channel)
        async for attempt in retrying(max_wait_seconds=30):
            with attempt:
                return await enroll(config, stub)
    raise AssertionError("unreachable")


def usable_certificate(config: AgentConfig) -> DeviceCertificate:
    """The stored certificate, refusing one that expired: the device would be locked out of
    the mutual-TLS endpoint, and only a new enrollment can let it back in."""
    certificate = load_certificate(config.certificate_path)
    if certificate is None:
        raise CertificateProblem(
            f"{config.identity_path} exists but {config.certificate_path} does not; "
            "remove both and enroll again with a new --token"
        )
    if certificate.not_after <= datetime.now(UTC):
        raise CertificateProblem(
            f"the device certificate expired at {certificate.not_after:%Y-%m-%d %H:%M} UTC while the "
            f"control plane was out of reach; remove {config.identity_path} and "
            f"{config.certificate_path} and enroll again with a new --token"
        )
    return certificate


class Credentials:
    """The device certificate in use, and the broker TLS context that presents it; renewal
    replaces both (new channels and the broker client's next connect use the new one)."""

    def __init__(self, config: AgentConfig, certificate: DeviceCertificate, broker_tls: SSLContext) -> None:
        self.config = config
        self.certificate = certificate
        self.broker_tls = broker_tls

    async def renew_forever(self, link: DeviceLink) -> None:
        """Renews the certificate at two thirds of its life, retrying with backoff until it
        expires; serving and telemetry go on meanwhile."""
        while True:
            wait = (self.certificate.renew_at - datetime.now(UTC)).total_seconds()
            await asyncio.sleep(max(0.0, wait))
            async for attempt in retrying(max_wait_seconds=60, transient=RENEWAL_TRANSIENT, log_retries=True):
                with attempt:
                    await self.renew(link)

    async def renew(self, link: DeviceLink) -> None:
        """A new key, a certificate for it, then new channels and broker connections use them."""
        key = new_key()
        try:
            response = await link.stub.RenewCertificate(
                device_pb2.RenewCertificateRequest(csr=csr_pem(key, hostname_of(self.config))), timeout=30
            )
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.UNAUTHENTICATED:
                raise DeviceRevoked(exc.details() or "device certificate refused") from exc
            raise ControlPlaneUnavailable(f"renewal failed: {exc.code().name}: {exc.details()}") from exc
        self.certificate = store_certificate(self.config.certificate_path, key, response.certificate)
        await link.replace(self.certificate)
        self.certificate.load_into(self.broker_tls)  # paho's next (re)connect presents it
        log.info("renewed the device certificate; valid until %s", self.certificate.not_after.isoformat())


# -- desired state and status -------------------------------------------------------------------


async def watch_desired(link: DeviceLink, updater: Updater, desired: Latest[device_pb2.DesiredState]) -> None:
    """Keeps the desired-state stream open; reconnects with bounded, jittered backoff.

    Each outage gets a fresh backoff: a stream that stayed up for a while ends the retry
    sequence normally, so the next drop starts again from a short delay.
    """
    while True:
        async for attempt in retrying(max_wait_seconds=30):
            with attempt:
                await _watch_once(link, updater, desired)


async def _watch_once(link: DeviceLink, updater: Updater, desired: Latest[device_pb2.DesiredState]) -> None:
    request = device_pb2.WatchDesiredStateRequest(known_generation=updater.state.applied_generation)
    opened = time.monotonic()
    try:
        async for message in link.stub.WatchDesiredState(request):
            log.info(
                "desired state: generation %d, %s@%d",
                message.generation,
                message.bundle.name,
                message.bundle.version,
            )
            desired.put(message)
    except grpc.aio.AioRpcError as exc:
        if exc.code() == grpc.StatusCode.UNAUTHENTICATED:
            raise DeviceRevoked(exc.details() or "device credential refused") from exc
        log.warning("desired-state stream lost: %s %s", exc.code().name, exc.details())
        if time.monotonic() - opened < STREAM_ESTABLISHED_SECONDS:
            raise ControlPlaneUnavailable(str(exc.details())) from exc
        return  # it had been up: the next attempt starts a fresh backoff
    except asyncio.CancelledError:
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            raise  # the agent is stopping
        log.info("desired-state stream moved to the renewed certificate's channel")
        return  # its channel was retired after a certificate renewal
    if time.monotonic() - opened < STREAM_ESTABLISHED_SECONDS:
        raise ControlPlaneUnavailable("desired-state stream closed by the control plane")


async def apply_desired(
    updater: Updater, desired: Latest[device_pb2.DesiredState], verifier: UptaneVerifier, link: DeviceLink
) -> None:
    """Hands each desired state to the updater; a transient failure puts it back for later."""
    while True:
        wanted = await desired.get()
        try:
            await updater.apply(wanted, verifier, link.stub)
        except TransientFailure as exc:
            # The control plane away, a full or busy disk, a model unloaded under the load: the
            # models serve as they were and the update waits; a refusal was already reported.
            log.warning("generation %d will be retried: %s", wanted.generation, exc)
            await asyncio.sleep(5)
            desired.put_if_empty(wanted)


async def report_status(link: DeviceLink, reports: Latest[device_pb2.StatusReport]) -> None:
    """Sends the latest status report; while undeliverable, only the newest waits."""
    while True:
        report = await reports.get()
        try:
            await link.stub.ReportStatus(report, timeout=10)
        except grpc.aio.AioRpcError as exc:
            log.info("status report not delivered (%s); will send the latest when back", exc.code().name)
            reports.put_if_empty(report)
            await asyncio.sleep(2)
