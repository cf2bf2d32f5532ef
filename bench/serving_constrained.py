"""What constrained decoding costs per token: the API's streamed chat with a ``json_schema``
response format against the same chat without one (bench.serving runs both in the same run).

Both requests share the prompt, model, greedy sampling, seed and max_tokens; only
``response_format`` differs. The schema (a story as a title and chapters, each a heading and
free text) keeps the model writing JSON until max_tokens, crossing objects, arrays and strings,
so the mask is exercised at every kind of step rather than only inside one long string.
Decode tokens/s is taken as bench.serving takes it: tokens after the first over the time after
the first, the token count from the stream's usage chunk.
"""

from __future__ import annotations

import http.client
import json
import time
from typing import Any

import httpx

from bench.serving_sides import MODEL_ID, Run, Settings

CHAT_PROMPT = "Write a long story about a lighthouse keeper and a storm, with several chapters."
STORY_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "title": {"type": "string", "maxLength": 80},
        "chapters": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {
                    "number": {"type": "integer", "minimum": 1},
                    "heading": {"type": "string", "maxLength": 80},
                    "text": {"type": "string"},
                },
                "required": ["number", "heading", "text"],
                "additionalProperties": False,
            },
        },
    },
    "required": ["title", "chapters"],
    "additionalProperties": False,
}
TARGET_RATIO = 0.9  # constrained decode tokens/s over unconstrained, at least


def chat_body(settings: Settings, *, constrained: bool) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": MODEL_ID,
        "messages": [{"role": "user", "content": CHAT_PROMPT}],
        "max_tokens": settings.max_tokens,
        "temperature": settings.temperature,
        "seed": settings.seed,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if constrained:
        body["response_format"] = {
            "type": "json_schema",
            "json_schema": {"name": "story", "schema": STORY_SCHEMA, "strict": True},
        }
    return body


def chat_streamed(base_url: str, body: dict[str, Any]) -> Run:
    """One streamed chat completion, read line by line with the standard library (as
    bench.serving_sides reads completions), timed from the request."""
    url = httpx.URL(base_url)
    connection = http.client.HTTPConnection(url.host, url.port, timeout=300)
    first: float | None = None
    last: float | None = None
    tokens = 0
    parts: list[str] = []
    try:
        started = time.perf_counter()
        connection.request(
            "POST",
            "/v1/chat/completions",
            body=json.dumps(body),
            headers={"Content-Type": "application/json"},
        )
        response = connection.getresponse()
        if response.status != 200:
            raise SystemExit(f"api chat: HTTP {response.status}: {response.read()[:500]!r}")
        for raw in iter(response.readline, b""):
            line = raw.decode().rstrip("\r\n")
            if not line.startswith("data: "):
                continue
            payload = line.removeprefix("data: ")
            if payload == "[DONE]":
                break
            now = time.perf_counter() - started
            chunk = json.loads(payload)
            if chunk.get("usage"):
                tokens = int(chunk["usage"]["completion_tokens"])
            for choice in chunk["choices"]:
                text = choice["delta"].get("content") or ""
                if text and first is None:
                    first = now
                if text or choice["finish_reason"]:
                    last = now
                parts.append(text)
        total = time.perf_counter() - started
    finally:
        connection.close()
    return Run(text="".join(parts), tokens=tokens, total_s=total, first_token_s=first, last_token_s=last)


def figures(plain: list[Run], constrained: list[Run]) -> dict[str, Any]:
    """Medians of both, their ratio and whether every constrained output is a JSON prefix the
    schema allows (the output is cut at max_tokens, so it need not be complete)."""
    from statistics import median

    unconstrained_tps = median(run.decode_tps() for run in plain)
    constrained_tps = median(run.decode_tps() for run in constrained)
    ratio = constrained_tps / unconstrained_tps
    return {
        "chat_stream_decode_tokens_per_second": round(unconstrained_tps, 2),
        "json_schema_stream_decode_tokens_per_second": round(constrained_tps, 2),
        "ratio_json_schema_decode": round(ratio, 4),
        "target": TARGET_RATIO,
        "meets_target": ratio >= TARGET_RATIO,
        "completion_tokens": sorted({run.tokens for run in plain + constrained}),
        "json_outputs_start_as_schema": all(run.text.startswith('{"title": "') for run in constrained),
        "basis": "streamed chat decode tokens/s through the API, json_schema response_format over none",
    }
