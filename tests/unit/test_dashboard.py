"""The Grafana dashboard only charts metrics the services actually export."""

from __future__ import annotations

import json
import re
from pathlib import Path

from prometheus_client import REGISTRY

import services.common.metrics  # noqa: F401 - registers the metrics

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy/grafana/tessera-dashboard.json"


def test_every_dashboard_metric_is_exported() -> None:
    exported = set()
    for family in REGISTRY.collect():
        for sample in family.samples:
            exported.add(sample.name)
        exported.add(family.name)
    dashboard = json.loads(DASHBOARD.read_text())
    used = set()
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            used.update(re.findall(r"tessera_[a-z_]+", target["expr"]))
    assert used, "the dashboard charts nothing"
    families = {name.removesuffix("_total") for name in exported}

    def family(name: str) -> str:
        for suffix in ("_bucket", "_count", "_sum", "_total"):
            name = name.removesuffix(suffix)
        return name

    missing = {name for name in used if family(name) not in families}
    assert not missing, f"dashboard uses metrics nobody exports: {sorted(missing)}"
    assert len(dashboard["panels"]) >= 10
