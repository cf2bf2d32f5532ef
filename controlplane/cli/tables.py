"""Renders the fleet listing for people (a rich table) and for scripts (JSON)."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from rich.table import Table

from edgefleet.protos.fleet.v1 import common_pb2


def _ref(ref: common_pb2.BundleRef) -> str:
    return f"{ref.name}@{ref.version}" if ref.name else ""


def _state(value: int) -> str:
    return common_pb2.DeviceState.Name(value).removeprefix("DEVICE_STATE_").lower()


def _pin(device: common_pb2.DeviceSummary) -> dict[str, str] | None:
    if not device.HasField("pin"):
        return None
    pin = device.pin
    if pin.variant_id:
        return {"variant": pin.variant_id, "scope": pin.scope}
    return {
        "runtime": common_pb2.ModelFormat.Name(pin.format).removeprefix("MODEL_FORMAT_").lower(),
        "scope": pin.scope,
    }


def _pin_text(device: common_pb2.DeviceSummary) -> str:
    pin = _pin(device)
    if pin is None:
        return ""
    what = pin.get("variant") or pin.get("runtime", "")
    return f"pinned {what} ({pin['scope']})"


def _models(device: common_pb2.DeviceSummary) -> list[dict[str, Any]]:
    """Every model the device reported holding, as the listing shows it."""
    return [
        {"bundle": _ref(m.bundle), "variant": m.variant or None, "loaded": m.loaded} for m in device.models
    ]


def _models_text(device: common_pb2.DeviceSummary) -> str:
    """One line per model: "smollm2@1 gguf-q4_0 loaded"."""
    return "\n".join(
        f"{m['bundle']} {m['variant'] or '-'} {'loaded' if m['loaded'] else 'unloaded'}"
        for m in _models(device)
    )


def _short(text: str, limit: int = 60) -> str:
    return text[:limit] + "…" if len(text) > limit else text


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
                "models": _models(d),
                "desired_models": [_ref(m) for m in d.desired_models],
                "variant": d.variant or None,
                "selection_reason": d.selection_reason or None,
                "pin": _pin(d),
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
                "online": d.online,
            }
        )
    return rows


def devices_table(devices: Sequence[common_pb2.DeviceSummary], *, now: datetime | None = None) -> Table:
    now = now or datetime.now(UTC)
    table = Table(
        "device",
        "state",
        "models",
        "why",
        "api",
        "last seen",
        "tok/s",
        "latency",
        "requests",
        "error",
    )
    for d in devices:
        seen = _last_seen(d)
        age = f"{(now - seen).total_seconds():.0f}s ago" if seen else "never"
        # Agents that report no model list still name their active release and variant.
        models = _models_text(d) or " ".join(filter(None, [_ref(d.active_bundle), d.variant])) or "-"
        table.add_row(
            d.device_id,
            ("revoked" if d.revoked else _state(d.state)) + ("" if d.online or d.revoked else "\noffline"),
            "\n".join(filter(None, [models, _pin_text(d)])),
            _short(d.selection_reason) or "-",
            d.api_url or "-",
            age,
            f"{d.last_tokens_per_second:.1f}" if d.last_tokens_per_second else "-",
            f"{d.last_latency_ms:.0f} ms" if d.last_latency_ms else "-",
            str(d.requests_total),
            _short(d.last_error),
        )
    return table
