"""deploy/grafana/edgefleet-fleet.json only queries metrics the control plane's exporter exposes.

The names are compared with a real scrape of a live exporter (SQLite, loopback HTTP), not with
a list kept here, so renaming a metric without updating the dashboard fails this test.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlmodel import Session

from edgefleet.controlplane.store.engine import make_engine
from edgefleet.controlplane.store.models import Bundle, Device, DeviceModel, utcnow
from edgefleet.controlplane.telemetry.exporter import start_metrics_server
from edgefleet.controlplane.telemetry.ingest_health import IngestStats
from edgefleet.protos.fleet.v1 import common_pb2

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "edgefleet-fleet.json"
DATASOURCE = {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}

_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "bool"}
_KEYWORDS |= {"offset", "inf", "nan"}
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_VARIABLE = re.compile(r"\$\{?\w+\}?")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_IDENTIFIER = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*")
_LABEL_VALUES = re.compile(r"^\s*label_values\(\s*([A-Za-z_:][A-Za-z0-9_:]*)")


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects: identifiers that are not functions (followed
    by "("), keywords, label names in matchers or grouping clauses, durations or variables."""
    text = _STRING.sub('""', expr)
    text = _VARIABLE.sub("0", text)
    text = re.sub(r"\{[^}]*\}", "", text)
    text = re.sub(r"\[[^\]]*\]", "", text)
    text = _GROUPING.sub("", text)
    names = set()
    for match in _IDENTIFIER.finditer(text):
        rest = text[match.end() :].lstrip()
        if rest.startswith("(") or match.group().lower() in _KEYWORDS:
            continue
        if match.start() > 0 and (text[match.start() - 1].isdigit() or text[match.start() - 1] == "."):
            continue  # the exponent or unit of a number, e.g. 1e3
        names.add(match.group())
    return names


def test_metric_names_are_read_from_promql() -> None:
    assert metric_names('sum by (device) (rate(a_total{device=~"$device"}[$__rate_interval]))') == {"a_total"}
    assert metric_names("count(max by (d) (b) < $offline_after) or vector(0)") == {"b"}
    assert metric_names("max(c) - on(x) group_left(y) d offset 5m") == {"c", "d"}
    assert metric_names('e{reason="malformed or bad"} > bool 1e3') == {"e"}


def panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", [])


def expressions(dashboard: dict[str, Any]) -> Iterator[tuple[str, str]]:
    """(where, PromQL) of every panel target and query variable."""
    for panel in panels(dashboard):
        for target in panel.get("targets", []):
            yield panel["title"], target["expr"]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            query = variable["query"]
            yield f"${variable['name']}", query["query"] if isinstance(query, dict) else query


def referenced(dashboard: dict[str, Any]) -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    for where, expr in expressions(dashboard):
        label_values = _LABEL_VALUES.match(expr)
        names = {label_values.group(1)} if label_values else metric_names(expr)
        assert names, f"{where}: no metric in {expr!r}"
        for name in names:
            found.setdefault(name, set()).add(where)
    return found


@pytest.fixture
def dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return data


@pytest.fixture
def exposed(tmp_path: Path) -> set[str]:
    """Every sample name a live exporter serves for a fleet with one device on one release."""
    engine = make_engine(f"sqlite:///{tmp_path / 'cp.db'}")
    with Session(engine) as s, s.begin():
        bundle = Bundle(
            name="smollm2",
            version=1,
            release_metadata=b"m",
            manifest_json="{}",
            expires_at=utcnow() + timedelta(days=1),
        )
        s.add(bundle)
        s.add(
            Device(
                id="d1",
                state=common_pb2.DEVICE_STATE_ACTIVE,
                online=True,
                last_seen=utcnow(),
                models=[{"name": "smollm2", "version": 1, "variant": "gguf-q4_0", "loaded": True}],
            )
        )
        s.flush()
        assert bundle.id is not None
        s.add(DeviceModel(device_id="d1", name="smollm2", bundle_id=bundle.id))
    metrics = start_metrics_server("127.0.0.1:0", engine, IngestStats)
    try:
        text = httpx.get(f"http://127.0.0.1:{metrics.port}/metrics", timeout=10).text
    finally:
        metrics.stop()
        engine.dispose()
    return {sample.name for family in text_string_to_metric_families(text) for sample in family.samples}


def test_every_queried_metric_is_exposed(dashboard: dict[str, Any], exposed: set[str]) -> None:
    used = referenced(dashboard)
    missing = {name: sorted(where) for name, where in used.items() if name not in exposed}
    assert not missing, f"the dashboard queries metrics the exporter does not expose: {missing}"
    assert all(name.startswith("edgefleet_") for name in used)


def test_the_dashboard_covers_the_fleet(dashboard: dict[str, Any]) -> None:
    used = referenced(dashboard)
    for name in (
        "edgefleet_devices",
        "edgefleet_device_last_seen_age_seconds",
        "edgefleet_device_online",
        "edgefleet_device_tokens_per_second",
        "edgefleet_device_latency_seconds",
        "edgefleet_device_requests_total",
        "edgefleet_release_devices_desired",
        "edgefleet_release_devices_installed",
        "edgefleet_ingest_received_total",
        "edgefleet_ingest_stored_total",
        "edgefleet_ingest_rejected_total",
    ):
        assert name in used, f"no panel shows {name}"


def test_every_panel_uses_the_datasource_variable(dashboard: dict[str, Any]) -> None:
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["DS_PROMETHEUS"]["type"] == "datasource"
    assert variables["DS_PROMETHEUS"]["query"] == "prometheus"
    assert variables["device"]["datasource"] == DATASOURCE
    ids = []
    for panel in panels(dashboard):
        ids.append(panel["id"])
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == DATASOURCE, panel["title"]
        assert all(t["datasource"] == DATASOURCE for t in panel["targets"]), panel["title"]
    assert len(ids) == len(set(ids)), "panel ids are unique"
    assert dashboard["uid"] == "edgefleet-fleet"
