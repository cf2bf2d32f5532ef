"""bench.fanout's figures: one ``Run`` per fleet size, and the summary line comparing the
largest size with the first against the issue's targets. Kept apart from the measuring so the
arithmetic can be read (and tested) without a control plane."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

TARGET_RATIO = 1.5
TARGET_KIB_PER_DEVICE = 64.0
TARGET_DEPLOY_CALL_MS_PER_DEVICE = 1.0
TARGET_DEPLOY_FANOUT_S = 10.0
TARGET_ENROLL_PER_S = 100.0


@dataclass
class Run:
    """One fleet size on a fresh control plane; seconds, MiB and KiB."""

    devices: int
    workers: int = 1
    enroll_s: float = 0.0
    connect_s: float = 0.0
    deploy_call_s: float = 0.0
    deploy_fanout_s: float = 0.0
    deploy_reported_s: float = 0.0
    deploy_fanout_p50_s: float = 0.0  # half the devices held the new state by then
    deploy_fanout_p90_s: float = 0.0
    rollout_fanout_s: float | None = None
    rollout_reported_s: float | None = None
    rollout_completed_s: float | None = None
    cp_rss_idle_mib: float = 0.0
    cp_rss_enrolled_mib: float = 0.0
    cp_rss_connected_mib: float = 0.0
    cp_rss_after_fanout_mib: float = 0.0
    fleet_cpu_max: float = 0.0  # the busiest fleet worker's CPU over the deploy fan-out's wall time
    cp_cpu: float = 0.0  # the control plane's, likewise (2.0 = two cores)
    sim_rss_per_device_kib: float = 0.0  # the fleet workers' RSS growth per device
    cp_connections_connected: int = 0  # device connections the control plane holds, all connected
    cp_connections_after_fanout: int = 0  # and once the fan-outs are over and devices idle
    broker_rss_idle_mib: float | None = None  # our Mosquitto's, before any device connected
    broker_rss_connected_mib: float | None = None  # with every device connected to it

    def _per_device_kib(self, mib: float) -> float:
        return mib * 1024 / self.devices

    @property
    def enroll_per_s(self) -> float:
        return self.devices / self.enroll_s if self.enroll_s > 0 else float("inf")

    @property
    def deploy_call_ms_per_device(self) -> float:
        return self.deploy_call_s * 1000 / self.devices

    @property
    def cp_kib_per_connected_device(self) -> float:
        return self._per_device_kib(self.cp_rss_connected_mib - self.cp_rss_idle_mib)

    def figures(self) -> dict[str, Any]:
        rounded = {k: round(v, 3) if isinstance(v, float) else v for k, v in asdict(self).items()}
        return {
            **rounded,
            "enroll_per_s": round(self.enroll_per_s, 1),
            "deploy_call_ms_per_device": round(self.deploy_call_ms_per_device, 3),
            "deploy_ms_per_device": round(self.deploy_fanout_s * 1000 / self.devices, 3),
            "rollout_ms_per_device": None
            if self.rollout_fanout_s is None
            else round(self.rollout_fanout_s * 1000 / self.devices, 3),
            "cp_kib_per_connected_device": round(self.cp_kib_per_connected_device, 1),
            "cp_kib_per_enrolled_device": round(
                self._per_device_kib(self.cp_rss_enrolled_mib - self.cp_rss_idle_mib), 1
            ),
            "cp_kib_per_connection": round(
                self._per_device_kib(self.cp_rss_connected_mib - self.cp_rss_enrolled_mib), 1
            ),
            "cp_kib_per_device_after_fanout": round(
                self._per_device_kib(self.cp_rss_after_fanout_mib - self.cp_rss_idle_mib), 1
            ),
            "broker_kib_per_connection": self.broker_kib_per_connection,
        }

    @property
    def broker_kib_per_connection(self) -> float | None:
        """What a device's MQTT connection costs the broker (None: not measured)."""
        if self.broker_rss_idle_mib is None or self.broker_rss_connected_mib is None:
            return None
        return round(self._per_device_kib(self.broker_rss_connected_mib - self.broker_rss_idle_mib), 1)


def summary(runs: list[Run], notes: list[str], settings: dict[str, Any]) -> dict[str, Any]:
    baseline, largest = runs[0], runs[-1]
    # Judged on the deploy's fan-out, the path every change takes; the rollout's adds its
    # engine's tick (a fixed second or so), which would flatter the per-device ratio.
    of = "deploy"

    def fanout(run: Run) -> float:
        return run.deploy_fanout_s

    base_ms = fanout(baseline) * 1000 / baseline.devices
    top_ms = fanout(largest) * 1000 / largest.devices
    ratio = top_ms / base_ms if base_ms > 0 else float("inf")
    memory = largest.cp_kib_per_connected_device
    # Each size has a fresh control plane, so the growth between the first and the largest
    # size leaves out what any first devices cost once (warmed caches, imports, pools).
    added = largest.devices - baseline.devices
    marginal = (
        (
            (largest.cp_rss_connected_mib - largest.cp_rss_idle_mib)
            - (baseline.cp_rss_connected_mib - baseline.cp_rss_idle_mib)
        )
        * 1024
        / added
        if added > 0
        else None
    )

    def scaling(seconds: Callable[[Run], float | None]) -> float | None:
        """Per-device time at the largest size over that at the baseline size."""
        top, base = seconds(largest), seconds(baseline)
        if top is None or base is None or base <= 0:
            return None
        return round((top / largest.devices) / (base / baseline.devices), 3)

    return {
        "benchmark": "fanout",
        "figures": {
            "devices": largest.devices,
            "fanout_s": round(fanout(largest), 3),
            "fanout_ms_per_device": round(top_ms, 3),
            "deploy_call_ms_per_device": round(largest.deploy_call_ms_per_device, 3),
            "deploy_fanout_s": round(largest.deploy_fanout_s, 3),
            "rollout_fanout_s": None
            if largest.rollout_fanout_s is None
            else round(largest.rollout_fanout_s, 3),
            "cp_kib_per_connected_device": round(memory, 1),
            "cp_kib_per_added_device": None if marginal is None else round(marginal, 1),
            "cp_kib_per_connection": largest.figures()["cp_kib_per_connection"],
            "broker_kib_per_connection": largest.broker_kib_per_connection,
            "enroll_per_s": round(largest.enroll_per_s, 1),
            "fleet_cpu_max": round(max(r.fleet_cpu_max for r in runs), 3),
            "scaling": {
                "deploy": scaling(lambda r: r.deploy_fanout_s),
                "rollout": scaling(lambda r: r.rollout_fanout_s),
                "deploy_reported": scaling(lambda r: r.deploy_reported_s),
                "rollout_reported": scaling(lambda r: r.rollout_reported_s),
            },
            "runs": [r.figures() for r in runs],
        },
        "baseline": {
            "devices": baseline.devices,
            "fanout_s": round(fanout(baseline), 3),
            "fanout_ms_per_device": round(base_ms, 3),
        },
        "ratio": round(ratio, 3),
        "ratio_of": of,
        "target": TARGET_RATIO,
        "targets": {
            "ratio_max": TARGET_RATIO,
            "deploy_call_ms_per_device_max": TARGET_DEPLOY_CALL_MS_PER_DEVICE,
            "deploy_fanout_s_max": TARGET_DEPLOY_FANOUT_S,
            "rollout_fanout_s_max": TARGET_DEPLOY_FANOUT_S,
            "cp_kib_per_connected_device_max": TARGET_KIB_PER_DEVICE,
            "enroll_per_s_min": TARGET_ENROLL_PER_S,
        },
        "met": {
            "ratio": ratio <= TARGET_RATIO,
            "deploy_call_ms_per_device": largest.deploy_call_ms_per_device
            <= TARGET_DEPLOY_CALL_MS_PER_DEVICE,
            "deploy_fanout_s": largest.deploy_fanout_s <= TARGET_DEPLOY_FANOUT_S,
            "rollout_fanout_s": largest.rollout_fanout_s is not None
            and largest.rollout_fanout_s <= TARGET_DEPLOY_FANOUT_S,
            "cp_kib_per_connected_device": memory <= TARGET_KIB_PER_DEVICE,
            "enroll_per_s": largest.enroll_per_s >= TARGET_ENROLL_PER_S,
        },
        "notes": notes,
        "settings": settings,
    }
