"""Prometheus metrics for the device API, served at GET /metrics.

Each app owns its CollectorRegistry (never prometheus-client's global one), so tests and a
rebuilt app start from zero and two apps in one process never share series. Figures come
from three places: an ASGI middleware counts every response by endpoint and status; the
per-request InferenceStats (the same record telemetry gets) feed tokens, latency, time to
first token and decode speed; and a collector reads the live state (queue depth, the
models held) at scrape time, so a swapped model or a drained queue is never reported stale.

Label values are bounded on purpose: unknown paths are "other", requested model names
(which clients choose freely) never become labels, errors are our own codes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily, Metric
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from edgefleet.agent.api.admission import AdmissionQueue
from edgefleet.agent.api.served_adapters import adapters_of
from edgefleet.agent.runtimes.base import format_name
from edgefleet.agent.runtimes.keep_alive import KeepAliveRuntime
from edgefleet.agent.runtimes.model_table import ModelTable
from edgefleet.agent.stats import InferenceStats

CONTENT_TYPE = CONTENT_TYPE_LATEST  # what generate_latest writes: the Prometheus text format
OTHER = "other"
RELEASE_LABELS = ("bundle", "version", "variant")

ReleaseInfo = Callable[[str], Mapping[str, str] | None]
"""The installed release (bundle, version, variant) behind a model name; None when unknown."""

_TTFT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0)
_LATENCY_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
_RATE_BUCKETS = (1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0)


class ApiMetrics:
    """The app's registry and the series the API updates."""

    def __init__(
        self,
        *,
        models: ModelTable,
        queue: AdmissionQueue,
        endpoint_paths: Mapping[str, str],
        release_info: ReleaseInfo | None = None,
    ) -> None:
        """`endpoint_paths` maps InferenceStats.endpoint names to the route paths used as labels."""
        self.registry = CollectorRegistry(auto_describe=True)
        self._paths = dict(endpoint_paths)
        self._known_paths: set[str] = set(endpoint_paths.values())
        r = self.registry
        self._requests = Counter(
            "edgefleet_api_requests",
            "HTTP responses by endpoint and status.",
            ["endpoint", "status"],
            registry=r,
        )
        self._errors = Counter(
            "edgefleet_api_errors",
            "Model requests that failed, by endpoint and error code (client_disconnected and queue_full "
            "included).",
            ["endpoint", "code"],
            registry=r,
        )
        self._prompt_tokens = Counter(
            "edgefleet_api_prompt_tokens", "Prompt tokens processed.", ["endpoint"], registry=r
        )
        self._completion_tokens = Counter(
            "edgefleet_api_completion_tokens", "Tokens generated.", ["endpoint"], registry=r
        )
        self._ttft = Histogram(
            "edgefleet_api_time_to_first_token_seconds",
            "From request start (queueing included) to the first generated text.",
            ["endpoint"],
            buckets=_TTFT_BUCKETS,
            registry=r,
        )
        self._latency = Histogram(
            "edgefleet_api_request_duration_seconds",
            "Model request duration, from request start to the end of the work.",
            ["endpoint"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self._decode_rate = Histogram(
            "edgefleet_api_decode_tokens_per_second",
            "Decode speed of successful generations (tokens after the first over the time after it).",
            ["endpoint"],
            buckets=_RATE_BUCKETS,
            registry=r,
        )
        r.register(_LiveCollector(models=models, queue=queue, release_info=release_info))

    def add_route(self, path: str) -> None:
        """Let `path` appear as an endpoint label (anything else counts as "other")."""
        self._known_paths.add(path)

    def endpoint_label(self, path: str) -> str:
        return path if path in self._known_paths else OTHER

    def count_response(self, path: str, status: int) -> None:
        self._requests.labels(self.endpoint_label(path), str(status)).inc()

    def observe(self, stats: InferenceStats) -> None:
        """Record one model request's figures; cheap, so it is fine on the event loop."""
        endpoint = self._paths.get(stats.endpoint, OTHER)
        if stats.prompt_tokens:
            self._prompt_tokens.labels(endpoint).inc(stats.prompt_tokens)
        if stats.completion_tokens:
            self._completion_tokens.labels(endpoint).inc(stats.completion_tokens)
        if stats.error:
            self._errors.labels(endpoint, stats.error).inc()
            return
        self._latency.labels(endpoint).observe(stats.latency_ms / 1000.0)
        if stats.time_to_first_token_ms > 0:
            self._ttft.labels(endpoint).observe(stats.time_to_first_token_ms / 1000.0)
        if stats.tokens_per_second > 0:
            self._decode_rate.labels(endpoint).observe(stats.tokens_per_second)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _LiveCollector:
    """Reads queue depth and the models held when scraped."""

    def __init__(
        self, *, models: ModelTable, queue: AdmissionQueue, release_info: ReleaseInfo | None
    ) -> None:
        self._models = models
        self._queue = queue
        self._release_info = release_info

    def collect(self) -> Iterable[Metric]:
        queue = self._queue
        depth = GaugeMetricFamily(
            "edgefleet_api_queue_requests", "Model requests running or waiting for a slot.", labels=["state"]
        )
        depth.add_metric(["running"], queue.running)
        depth.add_metric(["waiting"], queue.waiting)
        yield depth
        limits = GaugeMetricFamily(
            "edgefleet_api_queue_limit", "How many requests may run or wait at once.", labels=["state"]
        )
        limits.add_metric(["running"], queue.limits.max_running)
        limits.add_metric(["waiting"], queue.limits.max_waiting)
        yield limits
        yield CounterMetricFamily(
            "edgefleet_api_queue_rejected",
            "Requests turned away with 429 (queue full).",
            value=queue.rejected,
        )
        runtimes = self._models.runtimes()
        loaded = GaugeMetricFamily(
            "edgefleet_model_loaded",
            "Per model the device holds: 1 while it is in memory, 0 while unloaded (idle or evicted).",
            labels=["model"],
        )
        info = InfoMetricFamily(
            "edgefleet_active_model",
            "Each model the device serves and the release it came from.",
            labels=["model", "runtime", "format", "device", "capabilities", *RELEASE_LABELS],
        )
        adapters = GaugeMetricFamily(
            "edgefleet_lora_adapter_bytes",
            "Each LoRA adapter served over a model (requests name it <model>:<adapter>): its file's size.",
            labels=["model", "adapter"],
        )
        for runtime in runtimes:
            description = runtime.describe()
            resident = not isinstance(runtime, KeepAliveRuntime) or runtime.loaded
            loaded.add_metric([description.model_id], int(resident))
            for adapter in adapters_of(runtime):  # bounded: a runtime holds a few at most
                adapters.add_metric([adapter.parent, adapter.info.name], adapter.info.size_bytes)
            release = self._release(description.model_id) or {}
            info.add_metric(
                [
                    description.model_id,
                    description.runtime,
                    format_name(description.format),
                    description.device,
                    ",".join(sorted(c.value for c in description.capabilities)),
                    *(release.get(label, "") for label in RELEASE_LABELS),
                ],
                {},
            )
        yield loaded
        yield info
        yield adapters

    def _release(self, model: str) -> Mapping[str, str] | None:
        if self._release_info is None:
            return None
        try:
            return self._release_info(model)
        except Exception:  # a broken probe must not break the scrape; the model labels still help
            return None


class ResponseCounter:
    """Plain ASGI middleware (streams and disconnects pass untouched) counting every response."""

    def __init__(self, app: ASGIApp, *, metrics: ApiMetrics) -> None:
        self.app = app
        self._metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status: int | None = None

        async def counting_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, counting_send)
        except BaseException:
            # Unhandled errors become a 500 further out (Starlette's ServerErrorMiddleware).
            self._metrics.count_response(scope["path"], status or 500)
            raise
        self._metrics.count_response(scope["path"], status or 500)
