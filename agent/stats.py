"""Figures of one served request, handed from the API to telemetry."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class InferenceStats:
    """What one request cost: the API fills it, telemetry publishes it as an InferenceRecord."""

    model: str
    endpoint: str  # "chat.completions", "completions" or "embeddings"
    prompt_tokens: int
    completion_tokens: int
    latency_ms: float
    time_to_first_token_ms: float
    tokens_per_second: float
    stream: bool
    error: str = ""
