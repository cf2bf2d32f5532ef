"""Figures of one served request, handed from the API to telemetry."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class InferenceStats:
    """What one request cost: the API fills one per request, successful or not; /metrics observes
    it and telemetry folds it into the interval's InferenceSummary of its model.

    Times run from the moment the handler started (see agent/api/timing.py): ``latency_ms`` to
    the end of generation, ``time_to_first_token_ms`` to the first generated text (0: none).
    ``tokens_per_second`` is the decode rate, completion tokens after the first over the time
    after the first token, or the whole-request rate when that interval is unknown.
    """

    model: str
    endpoint: str  # "chat.completions", "completions" or "embeddings"
    prompt_tokens: int
    completion_tokens: int
    latency_ms: float
    time_to_first_token_ms: float
    tokens_per_second: float
    stream: bool
    error: str = ""

    @property
    def _decoded(self) -> bool:
        """Whether the rate is the after-first-token one: a first token, more after it, time
        after it (else timing.py fell back to the whole-request rate, or there was nothing)."""
        return (
            self.tokens_per_second > 0
            and self.time_to_first_token_ms > 0
            and self.completion_tokens > 1
            and self.latency_ms > self.time_to_first_token_ms
        )

    @property
    def decode_tokens(self) -> int:
        """Tokens generated after the first one: the numerator of ``tokens_per_second`` (0 when
        the rate is not a decode rate, e.g. a one-token reply timed from the request's start).

        Rates of several requests combine as the sum of these over the sum of ``decode_seconds``
        (a token-weighted rate); averaging ``tokens_per_second`` would not.
        """
        return self.completion_tokens - 1 if self._decoded else 0

    @property
    def decode_seconds(self) -> float:
        """The denominator of ``tokens_per_second``: the time from the first token to the end."""
        return self.decode_tokens / self.tokens_per_second if self._decoded else 0.0
