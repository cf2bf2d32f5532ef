"""What the agent's telemetry produces: per-interval inference summaries, heartbeats, status."""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from edgefleet.agent.api.timing import RequestTimer
from edgefleet.agent.config import AgentConfig
from edgefleet.agent.service import AgentService
from edgefleet.agent.stats import InferenceStats
from edgefleet.agent.telemetry.aggregate import (
    UNATTRIBUTED_MODEL,
    InferenceAggregator,
    ModelSummary,
    ServedRelease,
    percentiles,
)
from edgefleet.agent.telemetry.outbox import Outbox
from edgefleet.agent.telemetry.recorder import Telemetry
from edgefleet.agent.telemetry.resources import ResourceSampler
from edgefleet.agent.update.state import AgentState, InstallRecord
from edgefleet.protos.fleet.topics import TopicKind
from edgefleet.protos.fleet.v1 import common_pb2, telemetry_pb2

T0 = datetime(2025, 1, 2, 3, 4, 0, tzinfo=UTC)
SMOLLM2 = ServedRelease(bundle="smollm2", version=3, variant="gguf-q4")


class Clock:
    """A settable clock: interval boundaries are where the test says they are."""

    def __init__(self, now: datetime = T0) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> datetime:
        self.now += timedelta(seconds=seconds)
        return self.now


def request(
    *,
    model: str = "smollm2",
    endpoint: str = "chat.completions",
    prompt_tokens: int = 10,
    completion_tokens: int = 20,
    latency_ms: float = 100.0,
    ttft_ms: float = 10.0,
    error: str = "",
    stream: bool = False,
) -> InferenceStats:
    """One request's stats; tokens_per_second as agent/api/timing.py would compute it."""
    decode_ms = latency_ms - ttft_ms
    rate = (completion_tokens - 1) / (decode_ms / 1000) if completion_tokens > 1 and decode_ms > 0 else 0.0
    return InferenceStats(
        model=model,
        endpoint=endpoint,
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        latency_ms=latency_ms,
        time_to_first_token_ms=ttft_ms,
        tokens_per_second=rate,
        stream=stream,
        error=error,
    )


def only(summaries: tuple[ModelSummary, ...]) -> ModelSummary:
    assert len(summaries) == 1, summaries
    return summaries[0]


# -- InferenceStats: the per-request decode figures ----------------------------------------


def test_decode_figures_are_the_numerator_and_denominator_of_the_request_timer_rate() -> None:
    reported: list[InferenceStats] = []
    timer = RequestTimer(observer=reported.append, endpoint="chat.completions", model="m", stream=True)
    timer.mark_first_token(at=timer.started_at + 0.25)
    timer.mark_finished(at=timer.started_at + 1.25)
    timer.report(prompt_tokens=7, completion_tokens=101)
    (stats,) = reported
    assert stats.decode_tokens == 100
    assert stats.decode_seconds == pytest.approx(1.0)
    assert stats.decode_tokens / stats.decode_seconds == pytest.approx(stats.tokens_per_second)


@pytest.mark.parametrize(
    ("completion_tokens", "ttft_ms", "latency_ms"),
    [(0, 0.0, 5.0), (1, 10.0, 12.0), (5, 0.0, 100.0), (5, 20.0, 20.0)],
    ids=["embedding", "one-token", "no-first-token", "no-time-after-first"],
)
def test_requests_without_a_decode_interval_add_no_decode_figures(
    completion_tokens: int, ttft_ms: float, latency_ms: float
) -> None:
    stats = request(completion_tokens=completion_tokens, ttft_ms=ttft_ms, latency_ms=latency_ms)
    assert (stats.decode_tokens, stats.decode_seconds) == (0, 0.0)


# -- the aggregator ---------------------------------------------------------------------


def test_percentiles_interpolate_linearly_like_numpy() -> None:
    assert percentiles([float(v) for v in range(1, 11)], (50, 95)) == pytest.approx((5.5, 9.55))
    assert percentiles([42.0], (50, 95)) == (42.0, 42.0)
    assert percentiles([], (50, 95)) == (0.0, 0.0)


def test_latency_and_ttft_percentiles_and_max_over_successful_requests() -> None:
    aggregator = InferenceAggregator(clock=Clock())
    for i in range(1, 11):
        aggregator.add(request(latency_ms=100.0 * i, ttft_ms=float(i)))
    aggregator.add(request(latency_ms=5000.0, ttft_ms=0.0, endpoint="embeddings", completion_tokens=0))
    summary = only(aggregator.drain().summaries)
    assert summary.requests == 11
    assert summary.latency_ms_p50 == pytest.approx(600.0)  # 100..1000 and 5000: the 6th of 11
    assert summary.latency_ms_max == 5000.0
    # TTFT only over the requests that have one (the embedding has none)
    assert summary.time_to_first_token_ms_p50 == pytest.approx(5.5)
    assert summary.time_to_first_token_ms_p95 == pytest.approx(9.55)


def test_decode_rate_is_token_weighted_not_a_mean_of_rates() -> None:
    aggregator = InferenceAggregator(clock=Clock())
    long = request(completion_tokens=101, ttft_ms=100.0, latency_ms=1100.0)  # 100 tokens in 1 s
    short = request(completion_tokens=3, ttft_ms=50.0, latency_ms=60.0)  # 2 tokens in 10 ms
    assert (long.tokens_per_second, short.tokens_per_second) == pytest.approx((100.0, 200.0))
    aggregator.add(long)
    aggregator.add(short)
    # a failed generation's speed does not count, whatever it was
    aggregator.add(request(completion_tokens=50, ttft_ms=10.0, latency_ms=20.0, error="client_disconnected"))
    summary = only(aggregator.drain().summaries)
    assert summary.tokens_per_second == pytest.approx(102 / 1.01)  # not (100 + 200) / 2
    assert summary.completion_tokens == 101 + 3 + 50


def test_one_request_summarized_keeps_its_own_decode_rate() -> None:
    aggregator = InferenceAggregator(clock=Clock())
    stats = request(completion_tokens=20, ttft_ms=5.0, latency_ms=100.0)
    aggregator.add(stats)
    assert only(aggregator.drain().summaries).tokens_per_second == pytest.approx(stats.tokens_per_second)


def test_errors_are_counted_by_code_and_not_timed() -> None:
    aggregator = InferenceAggregator(clock=Clock())
    aggregator.add(request(latency_ms=800.0))
    for _ in range(3):
        aggregator.add(request(latency_ms=0.1, ttft_ms=0.0, completion_tokens=0, error="queue_full"))
    aggregator.add(request(latency_ms=2.0, ttft_ms=0.0, prompt_tokens=9000, error="context_length_exceeded"))
    summary = only(aggregator.drain().summaries)
    assert summary.requests == 5
    assert summary.errors == 4
    assert summary.errors_by_code == {"queue_full": 3, "context_length_exceeded": 1}
    assert summary.prompt_tokens == 10 + 3 * 10 + 9000  # refused prompts were still read
    assert summary.latency_ms_p50 == summary.latency_ms_max == 800.0


def test_summaries_split_per_model_and_release_with_endpoint_counts() -> None:
    aggregator = InferenceAggregator(clock=Clock())
    minilm = ServedRelease(bundle="minilm", version=1, variant="onnx-int8")
    aggregator.add(request(endpoint="chat.completions", stream=True), SMOLLM2)
    aggregator.add(request(endpoint="completions"), SMOLLM2)
    aggregator.add(request(model="minilm", endpoint="embeddings", completion_tokens=0, ttft_ms=0.0), minilm)
    # smollm2@4 replaced @3 during the interval: its requests are not credited to @3
    smollm2_v4 = ServedRelease(bundle="smollm2", version=4, variant="gguf-q8")
    aggregator.add(request(), smollm2_v4)
    minilm_summary, v3, v4 = aggregator.drain().summaries
    assert (minilm_summary.model, minilm_summary.release) == ("minilm", minilm)
    assert minilm_summary.requests_by_endpoint == {"embeddings": 1}
    assert minilm_summary.tokens_per_second == 0.0
    assert (v3.release, v3.requests) == (SMOLLM2, 2)
    assert v3.requests_by_endpoint == {"chat.completions": 1, "completions": 1}
    assert (v4.release, v4.requests) == (smollm2_v4, 1)


def test_intervals_are_contiguous_and_requests_land_in_the_interval_they_ended_in() -> None:
    clock = Clock()
    aggregator = InferenceAggregator(clock=clock)
    aggregator.add(request())
    end_1 = clock.advance(15)
    first = aggregator.drain()
    assert (first.start, first.end, first.requests) == (T0, end_1, 1)

    end_2 = clock.advance(15)
    empty = aggregator.drain()
    assert (empty.start, empty.end, empty.summaries) == (end_1, end_2, ())

    clock.advance(3)
    aggregator.add(request())
    aggregator.add(request())
    assert aggregator.pending == 2
    end_3 = clock.advance(12)
    third = aggregator.drain()
    assert (third.start, third.end, third.requests) == (end_2, end_3, 2)
    assert aggregator.pending == 0
    assert aggregator.recorded == 3


def test_memory_is_bounded_by_the_reservoir_while_counts_stay_exact() -> None:
    aggregator = InferenceAggregator(clock=Clock(), max_samples=64, rng=random.Random(7))
    latencies = [float(v) for v in range(1, 20_001)]
    random.Random(1).shuffle(latencies)
    for latency in latencies:
        aggregator.add(request(latency_ms=latency, ttft_ms=1.0))
    running = next(iter(aggregator._running.values()))
    assert len(running.latency.values) == 64
    assert len(running.ttft.values) == 64
    summary = only(aggregator.drain().summaries)
    assert summary.requests == 20_000
    assert summary.latency_ms_max == 20_000.0  # exact, not sampled
    # a uniform sample of 64 puts the median well inside the middle half
    assert 5_000 < summary.latency_ms_p50 < 15_000
    assert summary.latency_ms_p95 > summary.latency_ms_p50


def test_distinct_models_per_interval_are_bounded_and_the_rest_still_counted() -> None:
    aggregator = InferenceAggregator(clock=Clock(), max_models=3)
    for i in range(10):
        aggregator.add(request(model=f"made-up-{i}", error="model_not_found"))
    summaries = aggregator.drain().summaries
    assert len(summaries) == 4
    other = next(s for s in summaries if s.model == UNATTRIBUTED_MODEL)
    assert other.requests == 7
    assert sum(s.requests for s in summaries) == 10


def test_concurrent_records_and_drains_lose_and_double_count_nothing() -> None:
    aggregator = InferenceAggregator(clock=Clock(), max_samples=32)
    writers, per_writer = 8, 2_000
    drained: list[int] = []
    done = threading.Event()

    def write(n: int) -> None:
        for i in range(per_writer):
            aggregator.add(request(model=f"m{n % 3}", latency_ms=float(i + 1)))

    def drain() -> None:
        while not done.is_set():
            drained.append(aggregator.drain().requests)
        drained.append(aggregator.drain().requests)

    drainer = threading.Thread(target=drain)
    threads = [threading.Thread(target=write, args=(n,)) for n in range(writers)]
    drainer.start()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    done.set()
    drainer.join()
    assert sum(drained) == writers * per_writer == aggregator.recorded
    assert aggregator.pending == 0


# -- the Telemetry facade ---------------------------------------------------------------


@pytest.fixture
def outbox(tmp_path: Path) -> Iterator[Outbox]:
    with Outbox(tmp_path / "state" / "telemetry.sqlite3") as box:
        yield box


def bodies(outbox: Outbox) -> list[tuple[TopicKind, dict[str, Any]]]:
    return [(item.kind, json.loads(item.payload)) for item in outbox.pending(100)]


def test_telemetry_facade_builds_messages(outbox: Outbox) -> None:
    nudges: list[int] = []
    clock = Clock()
    telemetry = Telemetry(
        device_id="dev-9",
        outbox=outbox,
        nudge=lambda: nudges.append(1),
        clock=clock,
        release_of={"smollm2": SMOLLM2}.get,
    )
    assert telemetry.record_inference(request(prompt_tokens=3, completion_tokens=5, stream=True)) is None
    assert len(outbox) == 0  # in memory until the interval closes
    assert telemetry.inference_pending == 1
    assert (
        telemetry.record_heartbeat(
            state=6,
            active_bundle=("smollm2", 3),
            api_url="http://127.0.0.1:8080",
            rss_bytes=1024,
            uptime_seconds=1.5,
            requests_total=9,
            variant="gguf-q4",
        )
        == 1
    )
    assert telemetry.record_deployment(generation=4, bundle=None, state=7, detail="bad signature") == 2
    clock.advance(15)
    assert telemetry.flush_inference() == [3]
    assert telemetry.inference_pending == 0
    assert nudges == [1, 1, 1]
    (_, heartbeat), (_, deployment), (kind, inference) = bodies(outbox)
    assert kind is TopicKind.INFERENCE
    assert inference["deviceId"] == "dev-9"
    assert inference["schemaVersion"] == 1
    assert inference["windowStart"] == "2025-01-02T03:04:00Z"
    assert inference["time"] == "2025-01-02T03:04:15Z"
    assert inference["model"] == "smollm2"
    assert inference["bundle"] == {"name": "smollm2", "version": "3"}
    assert inference["variant"] == "gguf-q4"
    assert inference["requests"] == "1"
    assert inference["requestsByEndpoint"] == {"chat.completions": "1"}
    assert inference["errors"] == "0"
    assert inference["errorsByCode"] == {}
    assert (inference["promptTokens"], inference["completionTokens"]) == ("3", "5")
    assert inference["latencyMsP50"] == inference["latencyMsP95"] == inference["latencyMsMax"] == 100.0
    assert inference["timeToFirstTokenMsP50"] == 10.0
    assert inference["tokensPerSecond"] == pytest.approx(4 / 0.09)
    assert heartbeat["activeBundle"] == {"name": "smollm2", "version": "3"}
    assert heartbeat["state"] == "DEVICE_STATE_ACTIVE"
    assert heartbeat["requestsTotal"] == "9"
    assert heartbeat["time"] == "2025-01-02T03:04:00Z"
    assert deployment["state"] == "DEVICE_STATE_FAILED"
    assert deployment["detail"] == "bad signature"
    assert deployment["generation"] == "4"


def test_telemetry_facade_heartbeat_carries_resources_and_pipeline_counters(tmp_path: Path) -> None:
    with Outbox(tmp_path / "small.sqlite3", max_records=2) as small:
        telemetry = Telemetry(device_id="dev-1", outbox=small)
        for generation in (1, 2, 3):
            telemetry.record_deployment(generation=generation, bundle=None, state=1, detail="")
        installed = common_pb2.InstalledModel(
            bundle=common_pb2.BundleRef(name="smollm2", version=3), variant="gguf-q4", loaded=True
        )
        seq = telemetry.record_heartbeat(
            state=6,
            active_bundle=None,
            api_url="",
            rss_bytes=1,
            uptime_seconds=1.0,
            requests_total=0,
            variant="",
            cpu_percent=37.5,
            memory_available_bytes=2**30,
            disk_free_bytes=2**34,
            models=[installed],
        )
        assert seq == 4
        (heartbeat,) = [body for kind, body in bodies(small) if kind is TopicKind.HEARTBEAT]
    assert heartbeat["cpuPercent"] == 37.5
    assert heartbeat["memoryAvailableBytes"] == str(2**30)
    assert heartbeat["diskFreeBytes"] == str(2**34)
    assert heartbeat["recordsProduced"] == "3"  # seqs 1..3 before this beat
    assert heartbeat["recordsDropped"] == "1"  # the third deployment pushed the first out
    assert heartbeat["outboxPending"] == "2"
    assert heartbeat["models"] == [
        {"bundle": {"name": "smollm2", "version": "3"}, "variant": "gguf-q4", "loaded": True}
    ]


def test_telemetry_facade_never_raises_when_the_outbox_fails(tmp_path: Path) -> None:
    outbox = Outbox(tmp_path / "o.sqlite3")
    telemetry = Telemetry(device_id="dev-1", outbox=outbox)
    telemetry.record_inference(request())
    telemetry.record_inference(request(model="other"))
    telemetry.record_inference(request(model="other"))
    outbox.close()  # every later put fails
    assert telemetry.record_deployment(generation=1, bundle=("b", 1), state=1, detail="") is None
    assert (
        telemetry.record_heartbeat(
            state=1,
            active_bundle=None,
            api_url="",
            rss_bytes=0,
            uptime_seconds=0,
            requests_total=0,
            variant="",
        )
        is None
    )
    assert telemetry.flush_inference() == []
    assert telemetry.lost == 4  # deployment, heartbeat, two summaries
    assert telemetry.requests_lost == 3


def test_a_failing_release_lookup_still_records_the_request(outbox: Outbox) -> None:
    def broken(model: str) -> ServedRelease | None:
        raise KeyError(model)

    telemetry = Telemetry(device_id="dev-1", outbox=outbox, release_of=broken)
    telemetry.record_inference(request())
    assert len(telemetry.flush_inference()) == 1
    ((_, body),) = bodies(outbox)
    assert body["requests"] == "1"
    assert body["variant"] == ""


def test_an_injected_aggregator_keeps_requests_recorded_before_telemetry_existed(outbox: Outbox) -> None:
    clock = Clock()
    early = InferenceAggregator(clock=clock)
    early.add(request(), SMOLLM2)
    clock.advance(40)
    telemetry = Telemetry(device_id="dev-1", outbox=outbox, clock=clock, aggregator=early)
    telemetry.record_inference(request())
    clock.advance(5)
    telemetry.flush_inference()
    summaries = [body for _, body in bodies(outbox)]
    assert sum(int(s["requests"]) for s in summaries) == 2
    assert {s["windowStart"] for s in summaries} == {"2025-01-02T03:04:00Z"}


# -- the agent's wiring ---------------------------------------------------------------------


class FakePublisher:
    """Stands in for TelemetryPublisher: keeps what set_status was handed."""

    def __init__(self) -> None:
        self.statuses: list[telemetry_pb2.DeviceStatus] = []

    def set_status(self, status: telemetry_pb2.DeviceStatus) -> None:
        self.statuses.append(status)


def installed(bundle: str = "smollm2", version: int = 3) -> InstallRecord:
    return InstallRecord(
        bundle=bundle,
        version=version,
        generation=5,
        variant="gguf-q4",
        model_format=1,
        artifact_sha256="0" * 64,
        length=1000,
    )


@pytest.fixture
def service(tmp_path: Path, outbox: Outbox) -> AgentService:
    config = AgentConfig(
        controlplane="127.0.0.1:1",
        state_dir=tmp_path,
        trust_path=tmp_path / "trust.json",
        telemetry_interval_seconds=0.05,
    )
    agent = AgentService(config)
    state = AgentState(
        phase=common_pb2.DEVICE_STATE_ACTIVE,
        desired_generation=6,
        applied_generation=5,
        models=(installed(),),
        last_error="",
    )
    agent.updater = SimpleNamespace(state=state, selection=None)  # type: ignore[assignment]
    agent.device_id = "dev-7"
    agent.api_url = "http://127.0.0.1:8080"
    agent.telemetry = Telemetry(
        device_id="dev-7", outbox=outbox, release_of=agent._served_release, aggregator=agent.inference
    )
    return agent


def test_service_heartbeat_reports_resources_counters_and_models(
    service: AgentService, outbox: Outbox
) -> None:
    service.record_heartbeat()
    assert service.record_heartbeat() == 2
    (_, _first), (_, second) = bodies(outbox)
    assert second["memoryAvailableBytes"] != "0"
    assert second["diskFreeBytes"] != "0"
    assert second["cpuPercent"] >= 0.0
    assert second["recordsProduced"] == "1"
    assert second["outboxPending"] == "1"
    assert second["recordsDropped"] == "0"
    assert second["models"] == [
        {"bundle": {"name": "smollm2", "version": "3"}, "variant": "gguf-q4", "loaded": False}
    ]
    assert second["requestsTotal"] == "0"


def test_service_attributes_requests_to_the_serving_release(service: AgentService, outbox: Outbox) -> None:
    service._observe(request())
    service._observe(request(model="unknown", error="model_not_found"))
    assert service.telemetry is not None
    service.telemetry.flush_inference()
    by_model = {body["model"]: body for _, body in bodies(outbox)}
    smollm2, unknown = by_model["smollm2"], by_model["unknown"]
    assert smollm2["bundle"] == {"name": "smollm2", "version": "3"}
    assert smollm2["variant"] == "gguf-q4"
    assert "bundle" not in unknown  # no release serves it
    assert unknown["errorsByCode"] == {"model_not_found": "1"}
    assert service.requests.total == 2


def test_service_summarises_an_adapter_under_its_name_with_its_models_release(
    service: AgentService, outbox: Outbox
) -> None:
    service._observe(request(model="smollm2:style0"))
    assert service.telemetry is not None
    service.telemetry.flush_inference()
    ((_, body),) = bodies(outbox)
    assert body["model"] == "smollm2:style0"
    assert body["bundle"] == {"name": "smollm2", "version": "3"} and body["variant"] == "gguf-q4"


def test_service_holds_requests_seen_before_telemetry_started(service: AgentService) -> None:
    telemetry, service.telemetry = service.telemetry, None
    service._observe(request())
    assert telemetry is not None
    assert telemetry.inference_pending == 1  # the same interval the telemetry flushes


async def test_service_flushes_every_interval_and_once_more_at_stop(
    service: AgentService, outbox: Outbox
) -> None:
    telemetry = service.telemetry
    assert telemetry is not None
    loop = asyncio.create_task(service._inference_loop(telemetry))
    service._observe(request())
    for _ in range(200):
        if len(outbox):
            break
        await asyncio.sleep(0.01)
    assert len(outbox) == 1
    loop.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await loop
    service._observe(request())
    await service._flush_inference(telemetry)  # what run() does once the API has stopped
    assert sum(int(body["requests"]) for _, body in bodies(outbox)) == 2
    assert telemetry.inference_pending == 0


def test_service_publishes_the_retained_status_on_every_transition(service: AgentService) -> None:
    publisher = FakePublisher()
    service.publisher = publisher  # type: ignore[assignment]
    service.updater.selection = SimpleNamespace(  # type: ignore[assignment]
        reason="fits in memory; best perplexity", to_message=lambda: common_pb2.VariantSelection()
    )
    failed = service.updater.state.with_phase(common_pb2.DEVICE_STATE_FAILED, error="bad signature")
    service._on_transition(failed, 6, "refused smollm2@4")
    (status,) = publisher.statuses
    assert status.schema_version == telemetry_pb2.TELEMETRY_SCHEMA_V1
    assert status.device_id == "dev-7"
    assert status.state == common_pb2.DEVICE_STATE_FAILED
    assert (status.desired_generation, status.applied_generation) == (6, 5)
    assert [(m.bundle.name, m.bundle.version, m.variant) for m in status.models] == [
        ("smollm2", 3, "gguf-q4")
    ]
    assert status.api_url == "http://127.0.0.1:8080"
    assert status.last_error == "bad signature"
    assert status.selection_reason == "fits in memory; best perplexity"
    assert status.time.ToDatetime(tzinfo=UTC) > datetime.now(UTC) - timedelta(minutes=1)


async def test_a_failing_status_publish_does_not_stop_the_transition(
    service: AgentService, outbox: Outbox
) -> None:
    class Broken:
        def set_status(self, status: telemetry_pb2.DeviceStatus) -> None:
            raise RuntimeError("broker client gone")

    service.publisher = Broken()  # type: ignore[assignment]
    service._on_transition(service.updater.state, 5, "agent started")
    assert [kind for kind, _ in bodies(outbox)] == [TopicKind.DEPLOYMENT]
    report = await asyncio.wait_for(service.reports.get(), timeout=1)
    assert report.detail == "agent started"


def test_resource_sampler_reads_this_process_and_the_state_dir(tmp_path: Path) -> None:
    sampler = ResourceSampler(tmp_path)
    sum(i * i for i in range(200_000))  # some CPU between the samples
    usage = sampler.sample()
    assert usage.cpu_percent >= 0.0
    assert usage.memory_available_bytes > 0
    assert usage.disk_free_bytes > 0
    assert ResourceSampler(tmp_path / "gone").sample().disk_free_bytes == 0
