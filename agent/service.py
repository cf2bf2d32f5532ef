"""The agent process: enroll once, restore the installed model, serve it, follow desired state.

Tasks on one event loop: the local API (uvicorn), the desired-state watch (reconnecting with
jittered backoff), the updater worker, the status reporter, the heartbeat and the timer that
closes each inference-telemetry interval. Blocking work (model loading, inference, SQLite, MQTT)
runs in threads. When the control plane or broker is gone, the API keeps serving and telemetry
waits in the durable outbox.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from typing import cast

import grpc
import uvicorn
from tenacity import AsyncRetrying, before_sleep_log, retry_if_exception_type, wait_random_exponential

from edgefleet.agent.api.admission import AdmissionQueue, QueueLimits
from edgefleet.agent.api.app import create_app
from edgefleet.agent.api.auth import require_api_key
from edgefleet.agent.api.limits import RequestLimits
from edgefleet.agent.config import AgentConfig, EffectiveSettings
from edgefleet.agent.device.channel import DeviceLink, open_enrollment_channel
from edgefleet.agent.device.identity import DeviceIdentity, load_identity, save_identity
from edgefleet.agent.device.tls import (
    CertificateProblem,
    DeviceCertificate,
    broker_tls_context,
    csr_pem,
    enrollment_key,
    load_certificate,
    new_key,
    store_certificate,
)
from edgefleet.agent.runtimes.keep_alive import KeepAliveRuntime
from edgefleet.agent.runtimes.memory_budget import MemoryBudget
from edgefleet.agent.runtimes.model_table import ModelTable
from edgefleet.agent.stats import InferenceStats
from edgefleet.agent.telemetry.aggregate import InferenceAggregator, ServedRelease
from edgefleet.agent.telemetry.outbox import Outbox, OutboxError
from edgefleet.agent.telemetry.outbox_open import OpenedOutbox, open_outbox
from edgefleet.agent.telemetry.publisher import TelemetryPublisher
from edgefleet.agent.telemetry.recorder import FlushSchedule, Telemetry
from edgefleet.agent.telemetry.resources import ResourceSampler, available_ram_bytes
from edgefleet.agent.update.artifacts import ArtifactStore
from edgefleet.agent.update.errors import ControlPlaneUnavailable, EnrollmentRefused, NotEnrolled
from edgefleet.agent.update.latest import Latest
from edgefleet.agent.update.state import (
    AgentState,
    StateError,
    StateNotSaved,
    load_state,
    remove_interrupted_writes,
    save_state,
)
from edgefleet.agent.update.updater import Updater
from edgefleet.agent.update.uptane_client import (
    GrpcMetadataFetcher,
    UptaneVerifier,
    rebuilt_state,
    recover_installed,
)
from edgefleet.protos.fleet.uptane import TrustAnchors
from edgefleet.protos.fleet.v1 import common_pb2, device_pb2, device_pb2_grpc, telemetry_pb2

log = logging.getLogger(__name__)


API_GRACE_SECONDS = 3.0
"""How long a stopping agent lets the local API finish its responses before cancelling them."""

SHUTDOWN_DEADLINE_SECONDS = 10.0
"""From the first SIGTERM/SIGINT, how long a stop may take before the process exits anyway,
abandoning work stuck in native code (a long tokenization, a generation, an unload)."""

STREAM_ESTABLISHED_SECONDS = 10.0
"""A desired-state stream that lived this long counts as a recovered connection."""

FLUSH_CHECK_SECONDS = 1.0
"""How often the inference-telemetry timer looks at its schedule: a shortened interval applies
within this long."""


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


RENEWAL_TRANSIENT = (ControlPlaneUnavailable, OSError, CertificateProblem)
"""A full disk or a bad answer must not stop the agent: it retries until the certificate expires."""


class DeviceRevoked(Exception):
    """The control plane no longer accepts this device's certificate."""


def bind_api_socket(host: str, port: int) -> socket.socket:
    """The local API's listening socket, bound before anything else so the port is known.

    proto=IPPROTO_TCP, not 0: asyncio turns Nagle off (TCP_NODELAY) only on connections whose
    socket says it is TCP, and with Nagle on, the first streamed token waits out the client's
    delayed ACK (about 40 ms) behind the response headers.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.set_inheritable(True)
    return sock


def reported_generation(state: AgentState) -> int:
    """The generation a status report names: the applied one while the device serves what it
    applied (the control plane takes an ACTIVE or IDLE report as that generation applied), the
    desired one while it works on it or refused it."""
    if state.phase in (common_pb2.DEVICE_STATE_ACTIVE, common_pb2.DEVICE_STATE_IDLE):
        return state.applied_generation
    return state.desired_generation


def hostname_of(config: AgentConfig) -> str:
    return config.hostname or socket.gethostname()


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


def rss_bytes() -> int:
    try:
        import psutil

        return int(psutil.Process().memory_info().rss)
    except Exception:  # psutil missing or /proc unreadable: report unknown
        return 0


@dataclass
class RequestCounter:
    """Counts served requests across API threads."""

    total: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self) -> None:
        with self._lock:
            self.total += 1


class AgentService:
    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self.models = ModelTable()
        self.budget = MemoryBudget(config.memory_budget_bytes)
        self.requests = RequestCounter()
        self.reports: Latest[device_pb2.StatusReport] = Latest()
        self.desired: Latest[device_pb2.DesiredState] = Latest()
        self.api_url = ""
        self.started = time.monotonic()
        self.stop_event = asyncio.Event()
        self.device_id = ""
        self.telemetry: Telemetry | None = None
        self.publisher: TelemetryPublisher | None = None
        # Requests served before telemetry exists (model restore, enrollment) wait here and go
        # out in the first summary, instead of being dropped.
        self.inference = InferenceAggregator()
        self.resources = ResourceSampler(config.state_dir)
        # Live settings a signed device config may change (the updater calls _apply_settings).
        self.flush_schedule = FlushSchedule(config.telemetry_interval_seconds)
        self.admission: AdmissionQueue | None = None
        self.outbox: Outbox | None = None
        self.recovery_notes: list[str] = []
        """What a damaged state file's rebuild could not recover (empty: nothing was rebuilt)."""
        self.telemetry_loss = ""
        """Set when a corrupt outbox was replaced: what was lost."""
        self.state_writes_failed = 0
        """State writes the disk refused since start (each logged; serving went on)."""

    # -- wiring ------------------------------------------------------------------------

    async def run(self) -> None:
        config = self.config
        config.state_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(config.state_dir, 0o700)
        anchors = TrustAnchors.from_bytes(config.trust_path.read_bytes())
        if anchors.tls_ca is None:
            raise CertificateProblem(f"trust file {config.trust_path} has no fleet TLS CA (tls_ca)")
        ca_pem = anchors.tls_ca
        for leftover in remove_interrupted_writes(config.state_dir):
            log.info("removed %s, left by an interrupted write", leftover)
        state = await asyncio.to_thread(self._boot_state, anchors)
        sock = self._bind()
        self.api_url = f"http://{config.listen_host}:{sock.getsockname()[1]}"

        identity = load_identity(config.identity_path)
        # Serve what is installed first: enrollment and the control plane may be unreachable.
        self.updater = Updater(
            config=config,
            store=ArtifactStore(config.artifact_dir, config.download_dir, config.unpacked_dir),
            models=self.models,
            state=state,
            on_transition=self._on_transition,
            available_ram=available_ram_bytes,
            budget=self.budget,
            on_settings=self._apply_settings,
            on_state_not_saved=self._count_state_not_saved,
        )
        server = self._api_server()
        api_task = asyncio.create_task(server.serve(sockets=[sock]), name="api")
        await self.updater.restore(collect_garbage=not self.recovery_notes)
        log.info("local API at %s", self.api_url)

        if identity is None:
            identity = await self._enroll_with_retry(ca_pem)
        try:
            self.certificate = usable_certificate(config)
        except CertificateProblem as exc:
            # Without a certificate the control plane and the broker are out of reach, but the
            # installed model is not: keep serving it until someone re-enrolls the device.
            log.error("%s; serving the installed model offline", exc)
            await self._serve_offline(server, api_task)
            return
        link = DeviceLink(identity.device_target, ca_pem, self.certificate)
        broker_url = config.mqtt_url or identity.mqtt_url
        broker_ca = config.mqtt_ca_path.read_bytes() if config.mqtt_ca_path else ca_pem
        self.broker_tls = broker_tls_context(broker_ca, self.certificate)
        self.device_id = identity.device_id
        try:
            opened: OpenedOutbox | None = await asyncio.to_thread(open_outbox, config.outbox_path)
        except OutboxError as exc:
            log.error("%s; serving without telemetry, the outbox is tried again later", exc)
            opened = None
        if opened is not None:
            self._start_telemetry(opened, broker_url)
        # What the device applied, never the generation it was working towards: the control
        # plane counts an ACTIVE report as that generation applied.
        self._on_transition(self.updater.state, reported_generation(self.updater.state), self._start_detail())

        verifier = UptaneVerifier(
            tuf_dir=config.tuf_dir,
            anchors=anchors,
            fetcher=GrpcMetadataFetcher(lambda: link.sync_stub),  # ngclient is synchronous
            device_id=identity.device_id,
        )
        tasks = [
            api_task,
            asyncio.create_task(self._watch(link), name="watch"),
            asyncio.create_task(self._apply_loop(verifier, link), name="updater"),
            asyncio.create_task(self._report_loop(link), name="reporter"),
            asyncio.create_task(self._heartbeat_loop(), name="heartbeat"),
            asyncio.create_task(self._inference_loop(), name="inference-telemetry"),
            asyncio.create_task(self._renew_loop(link), name="renewal"),
        ]
        if opened is None:
            tasks.append(asyncio.create_task(self._telemetry_later(broker_url), name="telemetry-start"))
        stopper = asyncio.create_task(self.stop_event.wait(), name="stop")
        try:
            done, _ = await asyncio.wait([*tasks, stopper], return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                if task is stopper or task.get_name() == "telemetry-start":
                    continue
                if task.cancelled():
                    raise RuntimeError(f"the agent's {task.get_name()} task was cancelled")
                if task.exception() is not None:
                    raise task.exception()  # type: ignore[misc]
        finally:
            server.should_exit = True
            for task in tasks[1:]:
                task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await asyncio.wait_for(api_task, timeout=API_GRACE_SECONDS)
            await asyncio.gather(*tasks[1:], return_exceptions=True)
            stopper.cancel()
            telemetry, publisher = self.telemetry, self.publisher
            if telemetry is not None:
                await self._flush_inference(telemetry)  # the API is down: a clean stop loses no figures
            if publisher is not None:
                await asyncio.to_thread(publisher.stop)
            if self.outbox is not None:
                self.outbox.close()
            await self._unload_models()
            await link.close()
            self._warn_unreported()

    def _boot_state(self, anchors: TrustAnchors) -> AgentState:
        """The persisted state, or, when the file is damaged, one rebuilt from what the disk
        proves installed (trusted metadata, re-hashed artifacts); ``recovery_notes`` then say
        what could not be recovered. A load still marked in progress counts as a crash of it.
        Saving is best effort: a full disk must not stop the agent from serving."""
        path = self.config.state_path
        try:
            loaded = load_state(path)
        except StateError as exc:
            log.error("%s; rebuilding it from the verified metadata and artifacts on disk", exc)
            aside = path.with_name(path.name + ".damaged")
            with contextlib.suppress(OSError):
                path.replace(aside)
            recovery = recover_installed(
                tuf_dir=self.config.tuf_dir, anchors=anchors, artifact_dir=self.config.artifact_dir
            )
            loaded = rebuilt_state(recovery)
            served = ", ".join(r.model_id for r in loaded.models) or "nothing"
            self.recovery_notes = [f"state file damaged (kept as {aside.name}); rebuilt: serving {served}"]
            self.recovery_notes += recovery.problems
            for note in self.recovery_notes:
                log.warning("state rebuild: %s", note)
        state = loaded.after_restart()
        if state.loading is not None:
            log.warning(
                "the agent died while loading %s (generation %d): %d crash(es) of that load",
                state.loading.model_id,
                state.loading.generation,
                state.loading.crashes,
            )
        if state != loaded or self.recovery_notes:
            try:
                save_state(path, state)
            except StateNotSaved as exc:
                self.state_writes_failed += 1
                log.error("%s; serving with the state in memory", exc)
        return state

    def _count_state_not_saved(self, exc: StateNotSaved) -> None:
        self.state_writes_failed += 1

    def _start_detail(self) -> str:
        notes = list(self.recovery_notes)
        if self.telemetry_loss:
            notes.append(self.telemetry_loss)
        return "agent started" + "".join(f"; {note}" for note in notes)

    def _start_telemetry(self, opened: OpenedOutbox, broker_url: str) -> None:
        """The outbox is open: the publisher starts sending and recording goes to the outbox."""
        self.outbox = opened.outbox
        publisher = TelemetryPublisher(
            device_id=self.device_id, broker_url=broker_url, outbox=opened.outbox, tls_context=self.broker_tls
        )
        telemetry = Telemetry(
            device_id=self.device_id,
            outbox=opened.outbox,
            nudge=publisher.nudge,
            release_of=self._served_release,
            aggregator=self.inference,
        )
        if opened.set_aside is not None:
            telemetry.note_outbox_reset(opened.lost_records)
            self.telemetry_loss = opened.describe_loss()
        self.telemetry = telemetry
        publisher.start()
        self.publisher = publisher

    async def _telemetry_later(self, broker_url: str) -> None:
        """Retries opening the outbox (a full disk, a read-only mount) with backoff, serving
        meanwhile; once open, telemetry starts and the current status goes out."""
        async for attempt in retrying(max_wait_seconds=60, transient=(OutboxError,), log_retries=True):
            with attempt:
                opened = await asyncio.to_thread(open_outbox, self.config.outbox_path)
        self._start_telemetry(opened, broker_url)
        state = self.updater.state
        detail = "; ".join(["telemetry started", *([self.telemetry_loss] if self.telemetry_loss else [])])
        self._on_transition(state, reported_generation(state), detail)

    async def _serve_offline(self, server: uvicorn.Server, api_task: asyncio.Task[None]) -> None:
        stopper = asyncio.create_task(self.stop_event.wait(), name="stop")
        await asyncio.wait([api_task, stopper], return_when=asyncio.FIRST_COMPLETED)
        stopper.cancel()
        server.should_exit = True
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await asyncio.wait_for(api_task, timeout=5)
        await self._unload_models()
        self._warn_unreported()

    def _warn_unreported(self) -> None:
        """Requests recorded after the last flush, or with no telemetry at all, are logged: their
        figures are lost, but not silently (the heartbeat's requests_total counted them too)."""
        pending = self.inference.pending
        if pending:
            log.warning("the figures of %d requests were never reported: no telemetry took them", pending)

    async def _unload_models(self) -> None:
        for name in self.models.names():
            old = self.models.remove(name)
            if old is not None:
                await asyncio.to_thread(self.models.retire, old, timeout=5)

    def _bind(self) -> socket.socket:
        return bind_api_socket(self.config.listen_host, self.config.listen_port)

    def _api_server(self) -> uvicorn.Server:
        app = create_app(
            models=self.models,
            observer=self._observe,
            health=self._health,
            limits=QueueLimits(
                max_running=self.config.max_running_requests, max_waiting=self.config.max_waiting_requests
            ),
            request_limits=RequestLimits(
                max_body_bytes=self.config.max_request_bytes,
                max_prompt_chars=self.config.max_prompt_chars,
                max_messages=self.config.max_messages,
                max_embedding_inputs=self.config.max_embedding_inputs,
                body_timeout_seconds=self.config.request_body_timeout_seconds,
            ),
            release_info=self._release_info,
        )
        self.admission = app.state.admission_queue
        if self.config.api_key:
            require_api_key(app, self.config.api_key)
        # h11 named, not left to "auto": the framing guard and limits are tested against it, and
        # installing httptools must not change how the device parses requests.
        config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off", http="h11")
        server = uvicorn.Server(config)
        return server

    async def _enroll_with_retry(self, ca_pem: bytes) -> DeviceIdentity:
        async with open_enrollment_channel(self.config.controlplane, ca_pem) as channel:
            stub = device_pb2_grpc.DeviceServiceStub(channel)
            async for attempt in retrying(max_wait_seconds=30):
                with attempt:
                    return await enroll(self.config, stub)
        raise AssertionError("unreachable")

    async def _renew(self, link: DeviceLink) -> None:
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

    # -- callbacks from the API and the updater ---------------------------------------

    def _apply_settings(self, settings: EffectiveSettings) -> None:
        """The live settings the updater hands over (at boot and when a device config changes
        them): queue limits without dropping anyone queued, and the telemetry interval."""
        self.flush_schedule.interval_seconds = settings.telemetry_interval_seconds
        if self.admission is not None:
            self.admission.set_limits(
                QueueLimits(
                    max_running=settings.max_running_requests, max_waiting=settings.max_waiting_requests
                )
            )

    def _observe(self, stats: InferenceStats) -> None:
        self.requests.add()
        if self.telemetry is not None:
            self.telemetry.record_inference(stats)
        else:  # not enrolled yet: held for the first interval telemetry flushes
            self.inference.add(stats, self._served_release(stats.model))

    def _served_release(self, model: str) -> ServedRelease | None:
        """The release serving `model` now: the bundle and variant its inference summary names."""
        record = self.updater.state.model(model)
        if record is None:
            return None
        return ServedRelease(bundle=record.bundle, version=record.version, variant=record.variant)

    def _release_info(self, model: str) -> dict[str, str] | None:
        """Which release and variant serve `model`, for the model-info metric."""
        record = self.updater.state.model(model)
        if record is None:
            return None
        return {"bundle": record.bundle, "version": str(record.version), "variant": record.variant}

    def _health(self) -> dict[str, object]:
        state = self.updater.state
        return {
            "state": common_pb2.DeviceState.Name(state.phase),
            "active": state.active.model_id if state.active else None,
            "installed": [r.model_id for r in state.models],
            "memory_budget_bytes": self.budget.limit_bytes,
            "memory_resident_bytes": self.budget.resident_bytes(),
            "last_error": state.last_error or None,
            "telemetry": self.telemetry.counters() if self.telemetry is not None else None,
            # The signed device config in force (protobuf JSON; None: none) and what it results in.
            "device_config": state.device_config or None,
            "settings": self.updater.settings.to_dict(),
            # What could not be recovered from a damaged state file, releases refused because
            # the runtime crashed loading them, state writes the disk refused.
            "recovery": self.recovery_notes or None,
            "crash_refused": [f"{c.model_id} (generation {c.generation})" for c in state.crashed] or None,
            "state_writes_failed": self.state_writes_failed,
            "telemetry_loss": self.telemetry_loss or None,
        }

    def installed_models(self, state: AgentState) -> list[common_pb2.InstalledModel]:
        """Every installed model, and whether it is in memory now (unloaded ones load on demand)."""
        listed = []
        for record in state.models:
            runtime = self.models.get(record.bundle)
            loaded = runtime is not None and (not isinstance(runtime, KeepAliveRuntime) or runtime.loaded)
            listed.append(
                common_pb2.InstalledModel(
                    bundle=common_pb2.BundleRef(name=record.bundle, version=record.version),
                    variant=record.variant,
                    loaded=loaded,
                )
            )
        return listed

    def _on_transition(self, state: AgentState, generation: int, detail: str) -> None:
        active = state.active
        report = device_pb2.StatusReport(
            state=state.phase,  # type: ignore[arg-type]
            generation=generation,
            api_url=self.api_url,
            error=state.last_error,
            error_kind=state.last_error_kind,
            variant=active.variant if active else "",
            detail=detail,
            models=self.installed_models(state),
        )
        if active is not None:
            report.active_bundle.name = active.bundle
            report.active_bundle.version = active.version
        selection = self.updater.selection
        if selection is not None:
            report.selection.CopyFrom(selection.to_message())  # the control plane keeps the latest
        self.reports.put(report)
        self._publish_status(state)
        if self.telemetry is not None:
            self.telemetry.record_deployment(
                generation=generation,
                bundle=(active.bundle, active.version) if active else None,
                state=state.phase,
                detail=detail,
                # Once per choice: the step where the variant was picked carries why.
                selection=selection if state.phase == common_pb2.DEVICE_STATE_FETCHING else None,
            )

    def device_status(self, state: AgentState) -> telemetry_pb2.DeviceStatus:
        """The retained status: what a dashboard subscribing now should learn about this device."""
        selection = self.updater.selection
        status = telemetry_pb2.DeviceStatus(
            schema_version=telemetry_pb2.TELEMETRY_SCHEMA_V1,
            device_id=self.device_id,
            state=cast("common_pb2.DeviceState", state.phase),
            desired_generation=state.desired_generation,
            applied_generation=state.applied_generation,
            models=self.installed_models(state),
            api_url=self.api_url,
            last_error=state.last_error,
            selection_reason=selection.reason if selection is not None else "",
        )
        status.time.FromDatetime(datetime.now(UTC))
        return status

    def _publish_status(self, state: AgentState) -> None:
        """Hands the latest status to the publisher (retained; it republishes after reconnects).

        Before the publisher exists (model restore at boot) there is nothing to hand it to; the
        transition recorded once it starts carries the state then.
        """
        if self.publisher is None:
            return
        try:
            self.publisher.set_status(self.device_status(state))
        except Exception:  # a status that cannot be published must not stop an update
            log.exception("could not publish the device status")

    # -- loops -------------------------------------------------------------------------

    async def _renew_loop(self, link: DeviceLink) -> None:
        """Renews the certificate at two thirds of its life, retrying with backoff until it
        expires; serving and telemetry go on meanwhile."""
        while True:
            wait = (self.certificate.renew_at - datetime.now(UTC)).total_seconds()
            await asyncio.sleep(max(0.0, wait))
            async for attempt in retrying(max_wait_seconds=60, transient=RENEWAL_TRANSIENT, log_retries=True):
                with attempt:
                    await self._renew(link)

    async def _watch(self, link: DeviceLink) -> None:
        """Keeps the desired-state stream open; reconnects with bounded, jittered backoff.

        Each outage gets a fresh backoff: a stream that stayed up for a while ends the retry
        sequence normally, so the next drop starts again from a short delay.
        """
        while not self.stop_event.is_set():
            async for attempt in retrying(max_wait_seconds=30):
                with attempt:
                    await self._watch_once(link)

    async def _watch_once(self, link: DeviceLink) -> None:
        request = device_pb2.WatchDesiredStateRequest(known_generation=self.updater.state.applied_generation)
        opened = time.monotonic()
        try:
            async for desired in link.stub.WatchDesiredState(request):
                log.info(
                    "desired state: generation %d, %s@%d",
                    desired.generation,
                    desired.bundle.name,
                    desired.bundle.version,
                )
                self.desired.put(desired)
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

    async def _apply_loop(self, verifier: UptaneVerifier, link: DeviceLink) -> None:
        while True:
            desired = await self.desired.get()
            try:
                await self.updater.apply(desired, verifier, link.stub)
            except (ControlPlaneUnavailable, StateNotSaved) as exc:
                # StateNotSaved: a full disk; the models serve as they were, the update waits.
                log.warning("generation %d will be retried: %s", desired.generation, exc)
                await asyncio.sleep(5)
                self.desired.put_if_empty(desired)

    async def _report_loop(self, link: DeviceLink) -> None:
        while True:
            report = await self.reports.get()
            try:
                await link.stub.ReportStatus(report, timeout=10)
            except grpc.aio.AioRpcError as exc:
                log.info("status report not delivered (%s); will send the latest when back", exc.code().name)
                self.reports.put_if_empty(report)
                await asyncio.sleep(2)

    async def _heartbeat_loop(self) -> None:
        while True:
            self.record_heartbeat()
            await asyncio.sleep(self.config.heartbeat_interval_seconds)

    def record_heartbeat(self) -> int | None:
        """Queues one heartbeat (None without telemetry); CPU is since the previous beat."""
        if self.telemetry is None:
            return None
        state = self.updater.state
        active = state.active
        usage = self.resources.sample()
        return self.telemetry.record_heartbeat(
            state=state.phase,
            active_bundle=(active.bundle, active.version) if active else None,
            api_url=self.api_url,
            rss_bytes=rss_bytes(),
            uptime_seconds=time.monotonic() - self.started,
            requests_total=self.requests.total,
            variant=active.variant if active else "",
            cpu_percent=usage.cpu_percent,
            memory_available_bytes=usage.memory_available_bytes,
            disk_free_bytes=usage.disk_free_bytes,
            models=self.installed_models(state),
        )

    async def _inference_loop(self, fixed: Telemetry | None = None) -> None:
        """Closes an inference interval every telemetry interval (one summary per model); the
        interval is read from the schedule each time round, so a device config changes it live.
        Flushes go to ``fixed``, else to the agent's telemetry once it started (until then, an
        outbox the disk refused, requests wait in the aggregator)."""
        schedule = self.flush_schedule
        while True:
            await asyncio.sleep(max(0.0, min(schedule.due_in(), FLUSH_CHECK_SECONDS)))
            telemetry = fixed or self.telemetry
            if schedule.due_in() <= 0 and telemetry is not None:
                schedule.flushed()  # first: a failing flush must not make this loop spin
                await self._flush_inference(telemetry)

    @staticmethod
    async def _flush_inference(telemetry: Telemetry) -> None:
        """In a thread: each summary is an fsync'd outbox put, too slow for the event loop. Flushes
        are serialized by Telemetry, so the stop's flush waits for one a cancelled loop left running.
        A failure is logged, never raised: it would end the agent, and serving matters more."""
        try:
            await asyncio.to_thread(telemetry.flush_inference)
        except Exception:
            log.exception("could not flush inference telemetry")


class StopSignals:
    """SIGTERM and SIGINT, heard on a thread of their own whatever the rest is doing.

    The signals are blocked in every thread (set before any other thread starts, inherited by
    all) and taken with ``sigwait`` here: a Python-level handler would wait for the main thread
    to run bytecode, which it does not while native code (a tokenization, a load) holds it. The
    first signal asks for a graceful stop and arms the deadline; a second signal, or the
    deadline, flushes the logs and exits at once.
    """

    SIGNALS = frozenset({signal.SIGINT, signal.SIGTERM})

    def __init__(self, request_stop: Callable[[], None], *, deadline_seconds: float) -> None:
        self._request_stop = request_stop
        self._deadline_seconds = deadline_seconds
        self._thread = threading.Thread(target=self._listen, name="stop-signals", daemon=True)

    def start(self) -> None:
        signal.pthread_sigmask(signal.SIG_BLOCK, self.SIGNALS)
        self._thread.start()

    def _listen(self) -> None:
        first = signal.sigwait(self.SIGNALS)
        log.info("%s: stopping (at most %.0f s)", signal.Signals(first).name, self._deadline_seconds)
        deadline = threading.Timer(self._deadline_seconds, exit_now, args=("the stop deadline passed",))
        deadline.daemon = True
        deadline.start()
        self._request_stop()
        second = signal.sigwait(self.SIGNALS)
        exit_now(f"a second signal ({signal.Signals(second).name})")


def exit_now(why: str) -> None:
    """Ends the process without waiting for threads stuck in native code. Nothing durable is
    lost: state and outbox writes are committed and fsynced as they happen; logs are flushed."""
    log.warning("exiting now: %s; in-flight work is abandoned", why)
    for handler in logging.getLogger().handlers:
        with contextlib.suppress(Exception):
            handler.flush()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(0)


def run_agent(config: AgentConfig) -> None:
    """Runs the agent until SIGINT or SIGTERM; exits within SHUTDOWN_DEADLINE_SECONDS of it."""

    async def main() -> None:
        service = AgentService(config)
        loop = asyncio.get_running_loop()
        signals.bind(partial(loop.call_soon_threadsafe, service.stop_event.set))
        await service.run()

    signals = _LateBound()
    StopSignals(signals, deadline_seconds=SHUTDOWN_DEADLINE_SECONDS).start()
    asyncio.run(main())


class _LateBound:
    """The stop request, bound once the event loop exists; a signal before that exits at once
    (nothing is being served yet)."""

    def __init__(self) -> None:
        self._target: Callable[[], object] | None = None

    def bind(self, target: Callable[[], object]) -> None:
        self._target = target

    def __call__(self) -> None:
        if self._target is None:
            exit_now("stopped before start-up finished")
        else:
            self._target()
