"""The agent process: enroll once, restore the installed model, serve it, follow desired state.

Tasks on one event loop: the local API (uvicorn), the desired-state watch (reconnecting with
jittered backoff), the updater worker, the status reporter, the heartbeat, the timer that
closes each inference-telemetry interval and certificate renewal. Blocking work (model
loading, inference, SQLite, MQTT) runs in threads. When the control plane or broker is gone,
the API keeps serving and telemetry waits in the durable outbox.

Start-up enters each part into one ``AsyncExitStack`` as it starts, the tasks into task groups
(edgefleet.agent.tasks.supervise): a stop, a failing task or a start-up step that fails
half-way (the API port taken, enrollment refused) unwinds exactly what had started, last
started first. The API stops before everything else (its grace, then in-flight generations are
cancelled), so the requests it finishes are still in the last telemetry flush; the models are
unloaded last.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from functools import partial

from fastapi import FastAPI

from edgefleet.agent.api.admission import AdmissionQueue, QueueLimits
from edgefleet.agent.api.app import create_app
from edgefleet.agent.api.auth import require_api_key
from edgefleet.agent.api.limits import RequestLimits
from edgefleet.agent.config import AgentConfig, EffectiveSettings
from edgefleet.agent.device.channel import DeviceLink
from edgefleet.agent.device.identity import load_identity
from edgefleet.agent.device.tls import CertificateProblem, broker_tls_context
from edgefleet.agent.runtimes.memory_budget import MemoryBudget
from edgefleet.agent.runtimes.model_table import ADAPTER_SEPARATOR, ModelTable
from edgefleet.agent.stats import InferenceStats
from edgefleet.agent.tasks.api_server import ApiServer, bind_api_socket
from edgefleet.agent.tasks.boot import boot_state
from edgefleet.agent.tasks.control import (
    Credentials,
    apply_desired,
    enroll_with_retry,
    report_status,
    retrying,
    usable_certificate,
    watch_desired,
)
from edgefleet.agent.tasks.desired_notices import DesiredNotices, follow_notices
from edgefleet.agent.tasks.signals import SHUTDOWN_DEADLINE_SECONDS, LateBound, StopSignals
from edgefleet.agent.tasks.status import (
    device_status,
    installed_models,
    reported_generation,
    rss_bytes,
    status_report,
)
from edgefleet.agent.tasks.supervise import StopRequested, start_essential, the_failure, until_stopped
from edgefleet.agent.telemetry.aggregate import InferenceAggregator, ServedRelease
from edgefleet.agent.telemetry.outbox import Outbox, OutboxError
from edgefleet.agent.telemetry.outbox_open import OpenedOutbox, open_outbox
from edgefleet.agent.telemetry.publisher import TelemetryPublisher
from edgefleet.agent.telemetry.recorder import FlushSchedule, Telemetry
from edgefleet.agent.telemetry.resources import ResourceSampler, available_ram_bytes
from edgefleet.agent.update.artifacts import ArtifactStore
from edgefleet.agent.update.latest import Latest
from edgefleet.agent.update.state import AgentState, StateNotSaved, remove_interrupted_writes
from edgefleet.agent.update.updater import Updater
from edgefleet.agent.update.uptane_client import GrpcMetadataFetcher, UptaneVerifier
from edgefleet.protos.fleet.uptane import TrustAnchors
from edgefleet.protos.fleet.v1 import common_pb2, device_pb2, telemetry_pb2

log = logging.getLogger(__name__)


API_GRACE_SECONDS = 3.0
"""How long a stopping agent lets the local API finish its responses before cancelling them."""

FLUSH_CHECK_SECONDS = 1.0
"""How often the inference-telemetry timer looks at its schedule: a shortened interval applies
within this long."""


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
        self.updater: Updater
        self.telemetry: Telemetry | None = None
        self.publisher: TelemetryPublisher | None = None
        self.notices: DesiredNotices | None = None  # with desired_via "broker" and a broker
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
        """Serves until ``stop_event`` is set (returns) or something fails (raises that one
        error, not the task groups' exception group); either way nothing it started runs on."""
        try:
            await self._run()
        except StopRequested:
            return
        except BaseExceptionGroup as ended:
            failure = the_failure(ended)
            if failure is not None:
                raise failure from None

    async def _run(self) -> None:
        config = self.config
        config.state_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(config.state_dir, 0o700)
        anchors = TrustAnchors.from_bytes(config.trust_path.read_bytes())
        if anchors.tls_ca is None:
            raise CertificateProblem(f"trust file {config.trust_path} has no fleet TLS CA (tls_ca)")
        ca_pem = anchors.tls_ca
        for leftover in remove_interrupted_writes(config.state_dir):
            log.info("removed %s, left by an interrupted write", leftover)
        boot = await asyncio.to_thread(boot_state, config, anchors)
        self.recovery_notes = boot.notes
        self.state_writes_failed += boot.write_failed

        async with contextlib.AsyncExitStack() as stack:
            stack.callback(self._warn_unreported)
            sock = stack.enter_context(
                contextlib.closing(bind_api_socket(config.listen_host, config.listen_port))
            )
            self.api_url = f"http://{config.listen_host}:{sock.getsockname()[1]}"
            identity = load_identity(config.identity_path)
            # Serve what is installed first: enrollment and the control plane may be unreachable.
            self.updater = Updater(
                config=config,
                store=ArtifactStore(config.artifact_dir, config.download_dir, config.unpacked_dir),
                models=self.models,
                state=boot.state,
                on_transition=self._on_transition,
                available_ram=available_ram_bytes,
                budget=self.budget,
                on_settings=self._apply_settings,
                on_state_not_saved=self._count_state_not_saved,
            )
            stack.push_async_callback(self._unload_models)  # last: nothing serves them any more
            api = ApiServer(self._api_app(), sock, grace_seconds=API_GRACE_SECONDS)
            api.start(await stack.enter_async_context(asyncio.TaskGroup()))
            stack.push_async_callback(api.stop)
            await self.updater.restore(collect_garbage=not self.recovery_notes)
            log.info("local API at %s", self.api_url)

            if identity is None:
                identity = await enroll_with_retry(config, ca_pem)
            try:
                certificate = usable_certificate(config)
            except CertificateProblem as exc:
                # Without a certificate the control plane and the broker are out of reach, but
                # the installed model is not: keep serving it until someone re-enrolls the device.
                log.error("%s; serving the installed model offline", exc)
                await until_stopped(self.stop_event)
            broker_url = config.mqtt_url or identity.mqtt_url
            # With notices on the broker connection, the control-plane connection is let go when
            # unused: an idle device costs the control plane nothing.
            via_broker = config.desired_via == "broker" and bool(broker_url)
            link = DeviceLink(
                identity.device_target,
                ca_pem,
                certificate,
                idle_seconds=config.controlplane_idle_seconds if via_broker else None,
            )
            stack.push_async_callback(link.close)
            self.device_id = identity.device_id
            if via_broker:
                self.notices = DesiredNotices(identity.device_id, self.desired, asyncio.get_running_loop())
            broker_ca = config.mqtt_ca_path.read_bytes() if config.mqtt_ca_path else ca_pem
            self.credentials = Credentials(config, certificate, broker_tls_context(broker_ca, certificate))
            stack.push_async_callback(self._stop_telemetry)
            try:
                opened: OpenedOutbox | None = await asyncio.to_thread(open_outbox, config.outbox_path)
            except OutboxError as exc:
                log.error("%s; serving without telemetry, the outbox is tried again later", exc)
                opened = None
            if opened is not None:
                self._start_telemetry(opened, broker_url)
            # What the device applied, never the generation it was working towards: the control
            # plane counts an ACTIVE report as that generation applied.
            state = self.updater.state
            self._on_transition(state, reported_generation(state), self._start_detail())

            verifier = UptaneVerifier(
                tuf_dir=config.tuf_dir,
                anchors=anchors,
                fetcher=GrpcMetadataFetcher(lambda: link.sync_stub),  # ngclient is synchronous
                device_id=identity.device_id,
            )
            loops = await stack.enter_async_context(asyncio.TaskGroup())
            if self.notices is not None:
                follow = follow_notices(
                    link,
                    self.updater,
                    self.desired,
                    self.notices,
                    every_listening=config.desired_poll_seconds,
                    every_deaf=config.desired_poll_without_broker_seconds,
                )
                start_essential(loops, follow, "watch")
            else:
                start_essential(loops, watch_desired(link, self.updater, self.desired), "watch")
            start_essential(loops, apply_desired(self.updater, self.desired, verifier, link), "updater")
            start_essential(loops, report_status(link, self.reports), "reporter")
            start_essential(loops, self._heartbeat_loop(), "heartbeat")
            start_essential(loops, self._inference_loop(), "inference-telemetry")
            start_essential(loops, self.credentials.renew_forever(link), "renewal")
            if opened is None:
                loops.create_task(self._telemetry_later(broker_url), name="telemetry-start")
            # The first to stop: the requests the API finishes are still counted in the flush.
            stack.push_async_callback(api.stop)
            await until_stopped(self.stop_event)

    def _api_app(self) -> FastAPI:
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
        return app

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
            device_id=self.device_id,
            broker_url=broker_url,
            outbox=opened.outbox,
            tls_context=self.credentials.broker_tls,
            listener=self.notices,
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

    async def _stop_telemetry(self) -> None:
        """Once the API and the loops stopped: the last inference figures go to the outbox (a
        clean stop loses none), the publisher says goodbye, the outbox closes."""
        telemetry, publisher = self.telemetry, self.publisher
        if telemetry is not None:
            await self._flush_inference(telemetry)
        if publisher is not None:
            await asyncio.to_thread(publisher.stop)
        if self.outbox is not None:
            self.outbox.close()

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

    # -- callbacks from the API and the updater ---------------------------------------

    def _apply_settings(self, settings: EffectiveSettings) -> None:
        """The live settings the updater hands over (at boot and when a device config changes
        them): queue limits without dropping anyone queued, the telemetry interval, and the
        mirrors and rate limit of the downloads that start from now on."""
        self.flush_schedule.interval_seconds = settings.telemetry_interval_seconds
        updater: Updater | None = getattr(self, "updater", None)
        if updater is not None:
            updater.store.mirrors.configure(settings.mirrors, settings.max_download_rate)
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
        """The release serving `model` now: the bundle and variant its inference summary names.

        Requests to a LoRA adapter are summarised under its own name, ``<model>:<adapter>``,
        with the release of the model it runs over."""
        state = self.updater.state
        record = state.model(model)
        if record is None and ADAPTER_SEPARATOR in model:
            record = state.model(model.partition(ADAPTER_SEPARATOR)[0])
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

    def _on_transition(self, state: AgentState, generation: int, detail: str) -> None:
        active = state.active
        selection = self.updater.selection
        models = installed_models(self.models, state)
        self.reports.put(
            status_report(
                state,
                generation=generation,
                detail=detail,
                api_url=self.api_url,
                models=models,
                selection=selection,
            )
        )
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
        return device_status(
            state,
            device_id=self.device_id,
            api_url=self.api_url,
            models=installed_models(self.models, state),
            selection=self.updater.selection,
        )

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

    # -- telemetry loops ---------------------------------------------------------------

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
            models=installed_models(self.models, state),
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


def run_agent(config: AgentConfig) -> None:
    """Runs the agent until SIGINT or SIGTERM; exits within SHUTDOWN_DEADLINE_SECONDS of it."""

    async def main() -> None:
        service = AgentService(config)
        loop = asyncio.get_running_loop()
        signals.bind(partial(loop.call_soon_threadsafe, service.stop_event.set))
        await service.run()

    signals = LateBound()
    StopSignals(signals, deadline_seconds=SHUTDOWN_DEADLINE_SECONDS).start()
    asyncio.run(main())
