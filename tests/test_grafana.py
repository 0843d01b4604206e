"""The Grafana dashboards in docs/grafana/: valid dashboard JSON, and every metric name their
PromQL uses is one the agent really exposes, checked against a scrape of the real agent
process (its endpoint on, a serial stream that raised an alert), not against a list."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from agent_harness import MOSQUITTO, STREAM
from conftest import REPO
from prom_harness import MetricsRig, sample_names, value

DASHBOARDS = sorted((REPO / "docs" / "grafana").glob("*.json"))
# the list: what the dashboard is for
REQUIRED = {"tsad_stream_score", "tsad_stream_threshold", "tsad_alerts_total",
            "tsad_inference_seconds_bucket", "tsad_outbox_depth"}

_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or",
             "unless", "offset", "inf", "nan", "atan2"}
_STRIP = [
    (re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`'), ""),  # strings
    (re.compile(r"\{[^{}]*\}"), ""),                                     # label matchers
    (re.compile(r"\[[^\]]*\]"), ""),                                     # ranges, subqueries
    (re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)"), ""),
    (re.compile(r"\boffset\s+-?\w+"), ""),
    (re.compile(r"\$\{?\w+\}?"), ""),                                    # Grafana variables
    (re.compile(r"(?<![\w:])\d+(?:\.\d+)?(?:[eE][+-]?\d+)?"), ""),      # numbers
]
_NAME = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*")


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (functions, keywords, labels, label
    values, durations and Grafana variables left out).  `label_values(metric, label)`,
    Grafana's variable query, selects its first argument."""
    expr = re.sub(r"\blabel_values\s*\(\s*([^,()]*(?:\{[^}]*\})?)\s*,\s*\w+\s*\)", r"\1", expr)
    for pattern, repl in _STRIP:
        expr = pattern.sub(repl, expr)
    names = set()
    for m in _NAME.finditer(expr):
        rest = expr[m.end():].lstrip()
        if not rest.startswith("(") and m.group() not in _KEYWORDS:
            names.add(m.group())
    return names


def expressions(node) -> list[str]:
    """Every PromQL expression of a dashboard: panel and annotation `expr`, variable queries."""
    out = []
    if isinstance(node, dict):
        for k, v in node.items():
            if k == "expr" and isinstance(v, str):
                out.append(v)
            elif k == "query" and isinstance(v, str) and "label_values" in v:
                out.append(v)
            else:
                out += expressions(v)
    elif isinstance(node, list):
        for v in node:
            out += expressions(v)
    return out


def test_metric_names_are_read_from_promql_as_prometheus_would():
    assert metric_names('histogram_quantile(0.99, sum by (instance, le) (rate('
                        'x_bucket{instance=~"$instance", a="b{c}"}[$__rate_interval])))') \
        == {"x_bucket"}
    assert metric_names('2 * a{state="anomaly"} + ignoring(state) b:rec offset 5m > bool 1e3') \
        == {"a", "b:rec"}
    assert metric_names('label_values(tsad_stream_state{instance=~"$instance"}, stream)') \
        == {"tsad_stream_state"}
    assert metric_names("sum without (le) (rate(c_total[5m])) / on(job) group_left d") \
        == {"c_total", "d"}


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_dashboard_is_valid_grafana_json(path: Path):
    d = json.loads(path.read_text())
    assert d["uid"] and d["title"] and isinstance(d["schemaVersion"], int)
    panels = d["panels"]
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for p in panels:
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24 and g["h"] > 0, p["title"]
        refs = [t["refId"] for t in p.get("targets", [])]
        assert len(refs) == len(set(refs)), p["title"]
        assert p["type"] == "row" or refs, f"panel {p['title']!r} has no query"
    variables = {v["name"] for v in d["templating"]["list"]}
    used = set(re.findall(r"\$\{?(\w+)", json.dumps(d))) - {"__interval", "__rate_interval",
                                                             "__range"}
    assert used <= variables, f"undefined variables: {used - variables}"
    names = set().union(*map(metric_names, expressions(d)))
    assert REQUIRED <= names, f"the dashboard does not show {REQUIRED - names}"
    kinds = {a.get("expr", "") for a in d["annotations"]["list"]}
    assert any("tsad_alerts_total" in k for k in kinds), "no alert annotations"


@pytest.mark.skipif(not Path(MOSQUITTO).exists(), reason="mosquitto not installed")
def test_every_metric_a_dashboard_queries_is_exposed(tmp_path, broker):
    rig = MetricsRig(tmp_path, broker.port).ready()
    try:
        rig.writer.normal(20)
        rig.writer.spikes(1)
        f = rig.wait(lambda f: value(f, "tsad_alerts_total", stream=STREAM, type="end") == 1,
                     "one alert, opened and ended")
    finally:
        rig.close()
    # A labelled counter nothing has incremented yet (no malformed line, no drop) has
    # only its HELP and TYPE lines: its declared sample names count too.
    suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"]}
    exposed = sample_names(f) | {fam.name + s for fam in f.values()
                                 for s in suffixes.get(fam.type, [""])}
    for path in DASHBOARDS:
        exprs = expressions(json.loads(path.read_text()))
        assert len(exprs) >= 10
        missing = {(n, e) for e in exprs for n in metric_names(e) if n not in exposed}
        assert not missing, f"{path.name}: not exposed by the agent: {sorted(missing)}"
