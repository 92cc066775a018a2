"""config/grafana-xdplb.json queries only what the metrics endpoint exports: every metric
name in a query or variable is a sample name of the exposition, and every label it
selects or groups by is one of that metric's labels (or one Prometheus adds)."""

from __future__ import annotations

import json
import re

from prometheus_client.parser import text_string_to_metric_families

from lb.metrics import render
from test_metrics import DOC

DASHBOARD = "config/grafana-xdplb.json"
SCRAPE_LABELS = {"instance", "job"}  # added by Prometheus at scrape time


def _exported() -> dict[str, set[str]]:
    """sample name -> its label names, from a stats document's exposition."""
    out: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(render(DOC).decode()):
        for s in family.samples:
            out.setdefault(s.name, set()).update(s.labels)
    return out


def _queries(dash: dict) -> list[str]:
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    exprs += [v["query"]["query"] for v in dash["templating"]["list"]
              if isinstance(v.get("query"), dict)]
    return exprs


def _labels_used(expr: str, metric: str) -> set[str]:
    """Labels in metric{...} selectors and in the by (...) clauses of the query."""
    used = set()
    for sel in re.findall(rf"{metric}\{{([^}}]*)\}}", expr):
        used |= set(re.findall(r"(\w+)\s*(?:=~|!=|!~|=)", sel))
    for group in re.findall(r"\bby\s*\(([^)]*)\)", expr):
        used |= {g.strip() for g in group.split(",") if g.strip()}
    for var in re.findall(r"label_values\([^,]+,\s*(\w+)\)", expr):
        used.add(var)
    return used


def test_every_query_uses_exported_metrics_and_labels():
    dash = json.load(open(DASHBOARD))
    exported = _exported()
    queries = _queries(dash)
    assert len(queries) >= 10
    seen = set()
    for expr in queries:
        names = set(re.findall(r"\bxdplb_\w+", expr))
        assert names, expr
        for name in names:
            assert name in exported, f"{name} (in {expr!r}) is not exported"
            extra = _labels_used(expr, name) - exported[name] - SCRAPE_LABELS
            assert not extra, f"{expr!r} uses labels {extra} {name} lacks"
        seen |= names
    # verdicts, drops, per-VIP and per-backend rates, backend states are all shown
    assert {"xdplb_packets_total", "xdplb_drops_total", "xdplb_vip_packets_total",
            "xdplb_backend_packets_total", "xdplb_backend_state",
            "xdplb_backend_healthy"} <= seen


def test_the_check_can_fail():
    exported = _exported()
    assert "xdplb_packets" not in exported  # the family name is not a sample name
    assert _labels_used('sum by (vip) (rate(xdplb_drops_total{reason="x"}[5m]))',
                        "xdplb_drops_total") - exported["xdplb_drops_total"] == {"vip"}
