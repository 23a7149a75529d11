"""The Grafana dashboard (deploy/grafana/tiered-dashboard.json) against a running daemon: every
expression parses and names only metrics and labels the daemon's /metrics exports, so a
renamed metric fails here instead of leaving an empty panel on a fleet's screen."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from conftest import ROOT, DaemonProc, wait_for, write_config
from helpers import example_state, orbax_save
from promql import PromQLError, parse

DASHBOARD = ROOT / "deploy" / "grafana" / "tiered-dashboard.json"
# Labels Prometheus puts on every series of a target, not the daemon: `job` and `node` are the
# ones deploy/prometheus/podmonitor.yaml sets (docs/deploy.md for other scrape configs).
TARGET_LABELS = {"job", "node", "instance", "pod", "namespace", "container"}
# Grafana's own variables, replaced by Grafana before the query reaches Prometheus
GRAFANA_VARIABLES = {"__rate_interval": "1m", "__interval": "30s", "__range": "6h"}
# Exported but not drawn, and why (every other tiered_ metric must be on the dashboard).
NOT_ON_DASHBOARD = {
    # the commit age panel shows the same fact as an age, which needs no time() arithmetic
    "tiered_last_commit_timestamp_seconds",
}
PANEL_TYPES = {"row", "timeseries", "stat", "state-timeline", "table", "bargauge", "gauge", "text"}


class Exported:
    """What one /metrics page offers a query: sample names (a counter's `_total`, a
    histogram's `_bucket`, `_sum` and `_count`), and each one's labels and label values."""

    def __init__(self, text: str) -> None:
        self.labels: dict[str, dict[str, set[str]]] = {}
        self.families: dict[str, str] = {}
        suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"]}
        for family in text_string_to_metric_families(text):
            self.families[family.name] = family.type
            # a labelled family with no series yet (peers before the first copy) still names
            # its samples
            for suffix in suffixes.get(family.type, [""]):
                self.labels.setdefault(family.name + suffix, {})
            for sample in family.samples:
                seen = self.labels.setdefault(sample.name, {})
                for label, value in sample.labels.items():
                    seen.setdefault(label, set()).add(value)


def grafana_to_promql(expr: str, variables: set[str]) -> str:
    """Replace Grafana's variables the way Grafana does before it sends the query; a variable
    the dashboard does not define is an error, as Grafana would send it verbatim."""

    def sub(m: re.Match[str]) -> str:
        name = m.group(1) or m.group(2)
        if name in GRAFANA_VARIABLES:
            return GRAFANA_VARIABLES[name]
        assert name in variables, f"undefined variable ${name} in {expr!r}"
        return "x"  # inside a matcher's string, as every use of $job and $node is

    return re.sub(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)", sub, expr)


def problems_of(expr: str, exported: Exported, variables: set[str]) -> list[str]:
    try:
        query = parse(grafana_to_promql(expr, variables))
    except PromQLError as err:
        return [f"does not parse: {err}"]
    found = []
    all_labels = {label for labels in exported.labels.values() for label in labels}
    for selector in query.selectors:
        name = selector.metric
        if name not in exported.labels:
            found.append(f"{name!r} is not exported by the daemon")
            continue
        own = exported.labels[name]
        for label, op, value in selector.matchers:
            if label in TARGET_LABELS:
                continue
            if own and label not in own:
                found.append(f"{name} has no label {label!r} (it has {sorted(own)})")
            elif op == "=" and label in own and value not in own[label]:
                found.append(f"{name}{{{label}}} is never {value!r} (only {sorted(own[label])})")
    unknown = query.labels - all_labels - TARGET_LABELS - {"le"}
    # a labelled family with no series yet (peers before the first copy) has labels that no
    # page shows: grouping a query over one is left unchecked
    if unknown and all(exported.labels.get(s.metric or "") for s in query.selectors):
        found.append(f"groups by labels no series has: {sorted(unknown)}")
    return found


def all_panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", [])  # a collapsed row holds its panels


def expressions(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    return [
        (panel["title"], target["expr"])
        for panel in all_panels(dashboard)
        for target in panel.get("targets", [])
    ]


def variable_queries(dashboard: dict[str, Any]) -> list[tuple[str, str, str]]:
    """label_values(SELECTOR, LABEL) of each query variable: (variable, selector, label)."""
    out = []
    for var in dashboard["templating"]["list"]:
        if var["type"] != "query":
            continue
        query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
        m = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", query)
        assert m, f"variable {var['name']}: {query!r} is not label_values(selector, label)"
        out.append((var["name"], m.group(1), m.group(2)))
    return out


def check(dashboard: dict[str, Any], exported: Exported) -> list[str]:
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    found = [
        f"{title}: {expr}: {problem}"
        for title, expr in expressions(dashboard)
        for problem in problems_of(expr, exported, variables)
    ]
    for name, selector, label in variable_queries(dashboard):
        found += [f"${name}: {p}" for p in problems_of(selector, exported, variables)]
        if label not in TARGET_LABELS:
            found.append(f"${name} lists values of {label!r}, which no target has")
    return found


@pytest.fixture(scope="module")
def metrics_text(tmp_path_factory: pytest.TempPathFactory) -> str:
    """/metrics of a real daemon that has promoted one step."""
    tmp_path = tmp_path_factory.mktemp("dashboard")
    config_path, cfg = write_config(tmp_path, f"file://{tmp_path}/durable")
    daemon = DaemonProc(config_path, cfg)
    try:
        daemon.wait_ready()
        orbax_save(cfg.local_dir, 50, example_state())

        def promoted() -> str | None:
            text = daemon.get("/metrics")[1].decode()
            return text if 'tiered_newest_step{tier="durable"} 50.0' in text else None

        return str(wait_for(promoted, what="promotion of step 50"))
    finally:
        daemon.terminate()


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    return dict(json.loads(DASHBOARD.read_text()))


def test_every_expression_names_what_the_daemon_exports(
    dashboard: dict[str, Any], metrics_text: str
) -> None:
    exported = Exported(metrics_text)
    assert check(dashboard, exported) == []
    used = {
        s.metric
        for _, expr in expressions(dashboard)
        for s in parse(grafana_to_promql(expr, {"job", "node"})).selectors
    }
    shown = {re.sub(r"_(total|bucket|sum|count)$", "", name) for name in used}
    ours = {name for name in exported.families if name.startswith("tiered_")}
    assert ours - shown == NOT_ON_DASHBOARD, "a metric the dashboard does not show"


def test_a_renamed_metric_fails_the_check(dashboard: dict[str, Any], metrics_text: str) -> None:
    """What the check is for: the daemon renames a metric, the dashboard still names the old
    one, and the check says which panels went empty."""
    renamed = Exported(metrics_text.replace("tiered_newest_step", "tiered_latest_step"))
    found = check(dashboard, renamed)
    assert found and all("'tiered_newest_step' is not exported" in p for p in found)
    assert any(p.startswith("Newest step on each tier:") for p in found)
    # a label value the daemon never sets is caught too
    broken = json.loads(json.dumps(dashboard).replace('tier=\\"durable\\"', 'tier=\\"remote\\"'))
    assert any("is never 'remote'" in p for p in check(broken, Exported(metrics_text)))


def test_the_json_is_a_current_grafana_dashboard(dashboard: dict[str, Any]) -> None:
    assert dashboard["schemaVersion"] >= 39  # Grafana 11's schema
    assert dashboard["uid"] and len(dashboard["uid"]) <= 40 and dashboard["title"]
    assert "id" not in dashboard or dashboard["id"] is None  # provisioned: Grafana assigns it
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    source = variables["datasource"]
    assert source["type"] == "datasource" and source["query"] == "prometheus"
    for name in ("job", "node"):
        assert variables[name]["type"] == "query" and variables[name]["includeAll"]
        assert variables[name]["datasource"]["uid"] == "${datasource}"
    ids = [p["id"] for p in all_panels(dashboard)]
    assert len(ids) == len(set(ids)), "panel ids repeat"
    cells: dict[tuple[int, int], str] = {}
    for panel in all_panels(dashboard):
        assert panel["type"] in PANEL_TYPES, panel["type"]
        grid = panel["gridPos"]
        assert all(isinstance(grid[k], int) and grid[k] >= 0 for k in ("h", "w", "x", "y"))
        assert grid["w"] >= 1 and grid["h"] >= 1 and grid["x"] + grid["w"] <= 24, panel["title"]
        for x in range(grid["x"], grid["x"] + grid["w"]):
            for y in range(grid["y"], grid["y"] + grid["h"]):
                assert (x, y) not in cells, f"{panel['title']} overlaps {cells[(x, y)]}"
                cells[(x, y)] = panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["description"], f"{panel['title']}: say what the panel shows"
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        refs = [t["refId"] for t in panel["targets"]]
        assert refs and len(refs) == len(set(refs))
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${datasource}"
            # every query is per node and per job, filtered by the dashboard's variables
            assert 'job=~"$job"' in target["expr"] and 'node=~"$node"' in target["expr"]
            assert re.search(r"by \([^)]*\bjob\b[^)]*\bnode\b", target["expr"]), target["expr"]


def test_the_panels_cover_what_the_issue_asks(dashboard: dict[str, Any]) -> None:
    used = {
        s.metric
        for _, expr in expressions(dashboard)
        for s in parse(grafana_to_promql(expr, {"job", "node"})).selectors
    }
    wanted = {
        "tiered_newest_step",  # the newest step on each tier
        "tiered_at_risk_steps",
        "tiered_uploaded_bytes_total",  # upload throughput
        "tiered_durable_commit_age_seconds",  # and lag
        "tiered_errors_total",
        "tiered_peer_replicated_step",
        "tiered_tier_bytes",  # disk use per tier
        "tiered_ready",
    }
    assert wanted <= used


def test_docs_describe_every_panel(dashboard: dict[str, Any]) -> None:
    status = (ROOT / "docs" / "status.md").read_text()
    section = status.split("## Grafana dashboard", 1)[1].split("\n## ", 1)[0]
    for panel in all_panels(dashboard):
        title = panel["title"] if panel["type"] == "row" else f"**{panel['title']}**"
        assert title in section, panel["title"]
    deploy = (ROOT / "docs" / "deploy.md").read_text()
    assert "deploy/grafana" in deploy and "grafana_dashboard" in deploy


def test_alert_rules_parse_too() -> None:
    """The same parser on deploy/prometheus/alerts.yaml, where promtool is not installed."""
    rules = yaml.safe_load((ROOT / "deploy" / "prometheus" / "alerts.yaml").read_text())
    for rule in rules["groups"][0]["rules"]:
        assert parse(rule["expr"]).selectors, rule["alert"]


@pytest.mark.parametrize(
    "expr",
    [
        "rate(tiered_uploaded_bytes_total)",  # rate needs a range
        "sum(tiered_ready",
        'tiered_ready{tier="local"',
        "tiered_ready + tiered_tier_bytes[5m]",
        "sum by (job (tiered_ready)",
        "frobnicate(tiered_ready)",
        'tiered_ready{node=~"("}',
    ],
)
def test_the_parser_refuses_what_prometheus_refuses(expr: str) -> None:
    with pytest.raises(PromQLError):
        parse(expr)


def test_the_grafana_manifests_carry_this_dashboard() -> None:
    """deploy/grafana/kustomization.yaml generates the ConfigMap from this very file."""
    kustomization = yaml.safe_load((DASHBOARD.parent / "kustomization.yaml").read_text())
    generated = {g["name"]: g for g in kustomization["configMapGenerator"]}
    assert DASHBOARD.name in generated["tiered-grafana-dashboard"]["files"]
    provider = yaml.safe_load((DASHBOARD.parent / "dashboards.yaml").read_text())
    assert Path(provider["providers"][0]["options"]["path"]).is_absolute()
