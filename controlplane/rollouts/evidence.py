"""Per-device figures for the health gates, from the inference summaries devices reported
(TelemetryRecord rows of kind "inference", payloads in protobuf's JSON mapping).

For a release rollout, "new" is what the rollout's release served on the device since it was
assigned, "old" what the release the device ran before served in the baseline window (an hour,
by default) before that. Summaries name the release that served them, so an interval that
straddles the update counts for the release that served it.

For a config rollout the release does not change, so the boundary is time: "new" is the
intervals that began after the device applied the config, "old" the baseline window before it
was assigned, of the same releases (a release the device did not serve afterwards is not
compared with anything).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from edgefleet.controlplane.rollouts.gates import Evidence, Figures, Interval
from edgefleet.controlplane.store.models import RolloutDevice, TelemetryRecord
from edgefleet.controlplane.store.values import as_utc, json_number

ReleaseKey = tuple[str, int]  # (bundle name, version)


@dataclass(frozen=True, slots=True)
class Summary:
    """The part of one stored InferenceSummary the gates read."""

    device_id: str
    release: ReleaseKey
    time: datetime  # end of the interval
    window_start: datetime | None
    interval: Interval


def _time(value: Any) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        return as_utc(datetime.fromisoformat(value.replace("Z", "+00:00")))
    except ValueError:
        return None


def summary(row: TelemetryRecord) -> Summary:
    payload = row.payload
    bundle = payload.get("bundle")
    bundle = bundle if isinstance(bundle, dict) else {}
    return Summary(
        device_id=row.device_id,
        release=(str(bundle.get("name", "")), int(json_number(bundle.get("version")))),
        time=as_utc(row.time),
        window_start=_time(payload.get("windowStart")),
        interval=Interval(
            requests=int(json_number(payload.get("requests"))),
            errors=int(json_number(payload.get("errors"))),
            latency_ms_p95=json_number(payload.get("latencyMsP95")),
            decode_tokens=int(json_number(payload.get("decodeTokens"))),
            decode_seconds=json_number(payload.get("decodeSeconds")),
        ),
    )


def _figures(items: Iterable[Summary]) -> Figures:
    return Figures.of(s.interval for s in items)


def for_release(
    rows: Sequence[RolloutDevice],
    summaries: Iterable[Summary],
    *,
    release: ReleaseKey,
    previous: Mapping[int, ReleaseKey],
    baseline: timedelta,
) -> list[Evidence]:
    """Evidence for a release rollout; ``previous`` maps bundle ids to their releases."""
    by_device = _by_device(summaries)
    result = []
    for row in rows:
        assigned = as_utc(row.assigned_at) if row.assigned_at else None
        mine = by_device.get(row.device_id, [])
        new = [s for s in mine if s.release == release and (assigned is None or s.time >= assigned)]
        old: Figures | None = None
        before = previous.get(row.previous_bundle_id) if row.previous_bundle_id is not None else None
        if before is not None and assigned is not None:
            old = _figures(
                s for s in mine if s.release == before and assigned - baseline <= s.time < assigned
            )
        result.append(Evidence(row.device_id, _figures(new), old))
    return result


def for_config(
    rows: Sequence[RolloutDevice], summaries: Iterable[Summary], *, baseline: timedelta
) -> list[Evidence]:
    """Evidence for a config rollout: the same releases after the config applied and before."""
    by_device = _by_device(summaries)
    result = []
    for row in rows:
        mine = by_device.get(row.device_id, [])
        assigned = as_utc(row.assigned_at) if row.assigned_at else None
        applied = as_utc(row.applied_at) if row.applied_at else assigned
        if assigned is None or applied is None:
            result.append(Evidence(row.device_id, Figures(), None))
            continue
        new = [s for s in mine if (s.window_start or s.time) >= applied]
        served = {s.release for s in new}
        old = [s for s in mine if s.release in served and assigned - baseline <= s.time <= assigned]
        result.append(Evidence(row.device_id, _figures(new), _figures(old)))
    return result


def _by_device(summaries: Iterable[Summary]) -> dict[str, list[Summary]]:
    grouped: defaultdict[str, list[Summary]] = defaultdict(list)
    for item in summaries:
        grouped[item.device_id].append(item)
    return grouped
