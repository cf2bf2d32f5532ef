"""How the agent learns of desired-state changes without holding a connection to the control
plane: notices on the MQTT connection it keeps for telemetry, and polls.

The control plane announces each change on the device's ``topics.desired_topic`` (a
``DesiredState``, the same hint the stream sends: what to install still comes from verified
metadata). Notices sent while the device was not subscribed are lost, so the agent asks the
control plane (``GetDesiredState``) whenever its subscription is granted again, and polls:
slowly (``every_listening``) while the subscription holds, as a safety net, and more often
(``every_deaf``) while it does not — the broker down, unreachable, or refusing the device.
Losing the broker also triggers a poll at once: a revoked device's broker session is ended,
and the poll is where it learns it was revoked (``DeviceRevoked`` stops the agent).

Between calls the agent's channel closes its connection (``DeviceLink(idle_seconds=...)``),
so an idle device costs the control plane nothing; the broker holds its connection instead.
A control plane that predates ``GetDesiredState`` (UNIMPLEMENTED) gets the stream instead.

Threads: ``DesiredNotices`` is the publisher's ``BrokerListener``; paho's network thread calls
it and it only hands each event to the event loop.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random

import grpc
from google.protobuf import json_format

from edgefleet.agent.device.channel import DeviceLink
from edgefleet.agent.tasks.control import DeviceRevoked, retrying, watch_desired
from edgefleet.agent.update.errors import ControlPlaneUnavailable
from edgefleet.agent.update.latest import Latest
from edgefleet.agent.update.updater import Updater
from edgefleet.protos.fleet.topics import desired_topic
from edgefleet.protos.fleet.v1 import device_pb2

log = logging.getLogger(__name__)

MAX_NOTICE_BYTES = 4096  # a DesiredState is a generation and a release name: far below this
JITTER = 0.2  # polls vary ±20 %, so a fleet started together does not poll in step
LOST_POLL_DELAY_S = (1.0, 5.0)  # after losing the broker, poll once within this (jittered)
POLL_TIMEOUT_S = 30.0


class NoGetDesiredState(Exception):
    """The control plane predates GetDesiredState (UNIMPLEMENTED): the agent holds a stream."""


class NoticeRefused(ValueError):
    """A message on the desired topic that is not a DesiredState within bounds."""


def parse_notice(payload: bytes) -> device_pb2.DesiredState:
    """The DesiredState a notice carries (unknown fields ignored, per the contract)."""
    if len(payload) > MAX_NOTICE_BYTES:
        raise NoticeRefused(f"notice of {len(payload)} bytes exceeds {MAX_NOTICE_BYTES}")
    try:
        document = json.loads(payload)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise NoticeRefused(f"notice is not JSON: {exc}") from exc
    if not isinstance(document, dict):
        raise NoticeRefused(f"notice is a JSON {type(document).__name__}, not an object")
    try:
        return json_format.ParseDict(document, device_pb2.DesiredState(), ignore_unknown_fields=True)
    except (json_format.ParseError, RecursionError) as exc:
        raise NoticeRefused(f"notice is not a DesiredState: {exc}") from exc


class DesiredNotices:
    """Bridges the broker subscription (paho's thread) to the agent's event loop."""

    def __init__(
        self, device_id: str, desired: Latest[device_pb2.DesiredState], loop: asyncio.AbstractEventLoop
    ) -> None:
        self._topic = desired_topic(device_id)
        self._desired = desired
        self._loop = loop
        self.listening = False  # the subscription holds (event loop's view)
        self.moved = asyncio.Event()  # set when ``listening`` changes
        self.received_count = 0
        self.refused_count = 0

    @property
    def topic(self) -> str:
        return self._topic

    def subscribed(self) -> None:
        self._loop.call_soon_threadsafe(self._set_listening, True)

    def lost(self) -> None:
        self._loop.call_soon_threadsafe(self._set_listening, False)

    def received(self, payload: bytes) -> None:
        try:
            state = parse_notice(payload)
        except NoticeRefused as exc:
            self._loop.call_soon_threadsafe(self._refused, exc)
            return
        self._loop.call_soon_threadsafe(self._deliver, state)

    def _set_listening(self, listening: bool) -> None:
        if listening != self.listening:
            self.listening = listening
            self.moved.set()

    def _refused(self, exc: NoticeRefused) -> None:
        self.refused_count += 1
        log.warning("desired-state notice refused: %s", exc)

    def _deliver(self, state: device_pb2.DesiredState) -> None:
        self.received_count += 1
        log.info(
            "desired-state notice: generation %d, %s@%d",
            state.generation,
            state.bundle.name,
            state.bundle.version,
        )
        self._desired.put(state)


async def ask_desired(link: DeviceLink, known_generation: int) -> device_pb2.DesiredState:
    """One GetDesiredState call; raises DeviceRevoked, ControlPlaneUnavailable, or
    NoGetDesiredState for a control plane without the call."""
    request = device_pb2.GetDesiredStateRequest(known_generation=known_generation)
    try:
        state: device_pb2.DesiredState = await link.stub.GetDesiredState(request, timeout=POLL_TIMEOUT_S)
        return state
    except grpc.aio.AioRpcError as exc:
        if exc.code() == grpc.StatusCode.UNAUTHENTICATED:
            raise DeviceRevoked(exc.details() or "device credential refused") from exc
        if exc.code() == grpc.StatusCode.UNIMPLEMENTED:
            raise NoGetDesiredState("the control plane has no GetDesiredState") from exc
        raise ControlPlaneUnavailable(f"desired state: {exc.code().name}: {exc.details()}") from exc


def jittered(seconds: float) -> float:
    return seconds * random.uniform(1 - JITTER, 1 + JITTER)


async def follow_notices(
    link: DeviceLink,
    updater: Updater,
    desired: Latest[device_pb2.DesiredState],
    notices: DesiredNotices,
    *,
    every_listening: float,
    every_deaf: float,
) -> None:
    """Polls the control plane at start, on every (re)subscription, soon after losing the
    broker, and every ``every_listening`` / ``every_deaf`` seconds (jittered) besides; notices
    feed ``desired`` in between. Unreachable: retried with jittered backoff up to ``every_deaf``."""
    while True:
        try:
            async for attempt in retrying(max_wait_seconds=every_deaf):
                with attempt:
                    state = await ask_desired(link, updater.state.applied_generation)
        except NoGetDesiredState:
            log.warning("the control plane predates desired-state notices; holding a stream instead")
            await watch_desired(link, updater, desired)
            return
        log.info(  # worded as the stream's line: one thing to look for in an agent's log
            "desired state: generation %d, %s@%d", state.generation, state.bundle.name, state.bundle.version
        )
        desired.put(state)
        await _until_next_poll(notices, every_listening=every_listening, every_deaf=every_deaf)


async def _until_next_poll(notices: DesiredNotices, *, every_listening: float, every_deaf: float) -> None:
    """Returns when the next poll is due: the interval passed, or the subscription came back
    (poll now: notices were missed) or was lost (poll shortly: revoked, or an outage)."""
    notices.moved.clear()
    interval = every_listening if notices.listening else every_deaf
    try:
        await asyncio.wait_for(notices.moved.wait(), jittered(interval))
    except TimeoutError:
        return
    if not notices.listening:
        await asyncio.sleep(random.uniform(*LOST_POLL_DELAY_S))
