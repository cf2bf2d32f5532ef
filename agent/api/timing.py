"""Per-request timing, turned into one InferenceStats for the telemetry observer.

Definitions (so dashboards compare like with like): latency runs from the moment the
handler starts to the end of generation; time to first token runs to the first generated
text; tokens per second is the decode rate, tokens after the first over the time after
the first, so prompt processing and queueing behind other requests do not dilute it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from edgefleet.agent.stats import InferenceStats

logger = logging.getLogger(__name__)


class RequestTimer:
    """Collects one request's timestamps and reports them exactly once."""

    def __init__(
        self, *, observer: Callable[[InferenceStats], None], endpoint: str, model: str, stream: bool
    ) -> None:
        self._observer = observer
        self._endpoint = endpoint
        self._stream = stream
        self.model = model
        self.started_at = time.perf_counter()
        self.started_at_wall = time.time()  # for OpenAI `created` fields
        self.first_token_at: float | None = None
        self.finished_at: float | None = None
        self._reported = False

    def mark_first_token(self, at: float | None = None) -> None:
        if self.first_token_at is None:
            self.first_token_at = time.perf_counter() if at is None else at

    def mark_finished(self, at: float | None = None) -> None:
        if self.finished_at is None:
            self.finished_at = time.perf_counter() if at is None else at

    def report(self, *, prompt_tokens: int = 0, completion_tokens: int = 0, error: str = "") -> None:
        """Hand the figures to the observer; later calls do nothing, observer errors are logged."""
        if self._reported:
            return
        self._reported = True
        self.mark_finished()
        assert self.finished_at is not None
        first = self.first_token_at
        stats = InferenceStats(
            model=self.model,
            endpoint=self._endpoint,
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            latency_ms=(self.finished_at - self.started_at) * 1000.0,
            time_to_first_token_ms=0.0 if first is None else (first - self.started_at) * 1000.0,
            tokens_per_second=decode_rate(
                completion_tokens, first_at=first, started_at=self.started_at, finished_at=self.finished_at
            ),
            stream=self._stream,
            error=error,
        )
        try:
            self._observer(stats)
        except Exception:  # telemetry must never break serving
            logger.exception("inference observer failed")


def decode_rate(tokens: int, *, first_at: float | None, started_at: float, finished_at: float) -> float:
    """Tokens per second after the first token; whole-request rate when there is no interval."""
    if first_at is not None and tokens > 1 and finished_at > first_at:
        return (tokens - 1) / (finished_at - first_at)
    if tokens > 0 and finished_at > started_at:
        return tokens / (finished_at - started_at)
    return 0.0
