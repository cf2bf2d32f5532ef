"""Renders the fleet listing for people (a rich table) and for scripts (JSON)."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from rich.table import Table

from protos.fleet.v1 import common_pb2


def _ref(ref: common_pb2.BundleRef) -> str:
    return f"{ref.name}@{ref.version}" if ref.name else ""


def _state(value: int) -> str:
    return common_pb2.DeviceState.Name(value).removeprefix("DEVICE_STATE_").lower()


def _last_seen(device: common_pb2.DeviceSummary) -> datetime | None:
    if not device.HasField("last_seen"):
        return None
    return device.last_seen.ToDatetime(tzinfo=UTC)


def devices_json(devices: Sequence[common_pb2.DeviceSummary]) -> list[dict[str, Any]]:
    rows = []
    for d in devices:
        seen = _last_seen(d)
        rows.append(
            {
                "device_id": d.device_id,
                "state": _state(d.state),
                "active_bundle": _ref(d.active_bundle) or None,
                "desired_bundle": _ref(d.desired_bundle) or None,
                "variant": d.variant or None,
                "api_url": d.api_url or None,
                "last_seen": seen.isoformat() if seen else None,
                "last_error": d.last_error or None,
                "tokens_per_second": round(d.last_tokens_per_second, 2),
                "latency_ms": round(d.last_latency_ms, 1),
                "requests_total": d.requests_total,
                "desired_generation": d.desired_generation,
                "applied_generation": d.applied_generation,
                "labels": dict(d.labels),
                "revoked": d.revoked,
            }
        )
    return rows


def devices_table(devices: Sequence[common_pb2.DeviceSummary], *, now: datetime | None = None) -> Table:
    now = now or datetime.now(UTC)
    table = Table("device", "state", "active", "api", "last seen", "tok/s", "latency", "requests", "error")
    for d in devices:
        seen = _last_seen(d)
        age = f"{(now - seen).total_seconds():.0f}s ago" if seen else "never"
        table.add_row(
            d.device_id,
            "revoked" if d.revoked else _state(d.state),
            _ref(d.active_bundle) or "-",
            d.api_url or "-",
            age,
            f"{d.last_tokens_per_second:.1f}" if d.last_tokens_per_second else "-",
            f"{d.last_latency_ms:.0f} ms" if d.last_latency_ms else "-",
            str(d.requests_total),
            (d.last_error[:60] + "…") if len(d.last_error) > 60 else d.last_error or "",
        )
    return table
