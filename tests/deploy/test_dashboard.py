"""The Grafana dashboard and Prometheus files in deploy/ name only series a live corral exports."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
import yaml
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from corral.cluster.cluster import ClusterCollector
from corral.exposition import merge
from tests.helpers import REPO_ROOT, poll

pytestmark = pytest.mark.integration

DEPLOY = REPO_ROOT / "deploy"
DASHBOARD = DEPLOY / "grafana" / "corral.json"
PROMETHEUS = DEPLOY / "prometheus" / "prometheus.yml"

# Series Prometheus makes itself for every scrape target, not corral's.
PROMETHEUS_SERIES = frozenset({"up"})

# PromQL words that look like identifiers but name no series. Functions and aggregations are
# also caught by the "(" that follows them; listing them keeps `sum by (x) (...)` safe too.
_KEYWORDS = frozenset(
    [
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
        "bool",
        "offset",
        "and",
        "or",
        "unless",
        "atan2",
        "inf",
        "nan",
        "sum",
        "min",
        "max",
        "avg",
        "count",
        "stddev",
        "stdvar",
        "topk",
        "bottomk",
        "quantile",
        "count_values",
        "group",
        "limitk",
        "rate",
        "irate",
        "increase",
        "delta",
        "idelta",
        "deriv",
        "histogram_quantile",
        "label_values",
        "label_replace",
        "abs",
        "absent",
        "clamp_min",
        "clamp_max",
        "vector",
        "scalar",
        "time",
    ]
)
_STRING = re.compile(r""""(?:\\.|[^"\\])*"|'(?:\\.|[^'\\])*'|`[^`]*`""")
_MATCHERS = re.compile(r"\{[^{}]*\}")  # label matchers, after strings are gone
_RANGE = re.compile(r"\[[^\]]*\]")  # [5m], [$__rate_interval], subqueries [1h:1m]
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)")
_VARIABLE = re.compile(r"\$\{[^}]*\}|\$\w+")  # Grafana: $backend, ${DS}, $__rate_interval
# Grafana's label_values(selector, label): only the selector names a series.
_LABEL_VALUES = re.compile(r"label_values\(\s*(?:((?:[^,{}()]|\{[^{}]*\})*),)?\s*\w+\s*\)")
_SELECTOR = re.compile(r"([A-Za-z_:][A-Za-z0-9_:]*)\s*(\{[^{}]*\})?")  # name{matchers}
_TOKEN = re.compile(
    r"(?P<number>\d+(?:\.\d+)?(?:[eE][+-]?\d+)?(?:ms|[smhdwy])*)"
    r"|(?P<ident>[A-Za-z_:][A-Za-z0-9_:]*)(?P<call>\s*\()?"
)


def metric_names(expr: str) -> set[str]:
    """The series names a PromQL expression selects (Grafana variables allowed)."""
    text = _LABEL_VALUES.sub(lambda m: m.group(1) or "", expr)
    text = _STRING.sub('""', text)
    text = _VARIABLE.sub("", text)
    text = _MATCHERS.sub("", text)
    text = _RANGE.sub("", text)
    text = _GROUPING.sub("", text)
    names = set()
    for token in _TOKEN.finditer(text):
        ident = token.group("ident")
        if ident is None or token.group("call") or ident in _KEYWORDS:
            continue
        names.add(ident)
    return names


def test_metric_names_extractor_skips_promql_syntax() -> None:
    """The extractor keeps series names and drops functions, clauses, labels, strings, ranges."""
    expr = (
        'histogram_quantile(0.95, sum by (le, backend) (rate(x_bucket{backend=~"$backend", '
        'code=~"5..|4.."}[$__rate_interval]))) / on (backend) group_left (name) y_total offset 5m'
        ' > bool 1e3 unless max without (gpu) (z{a="b{c}"})'
    )
    assert metric_names(expr) == {"x_bucket", "y_total", "z"}
    assert metric_names("label_values(corral_backend_up, backend)") == {"corral_backend_up"}
    assert metric_names('label_values(up{job="corral", a="b"}, instance)') == {"up"}
    assert metric_names("label_values(backend)") == set()


def walk_panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from walk_panels(panel.get("panels", []))  # collapsed rows nest theirs


def dashboard_queries(dashboard: dict[str, Any]) -> dict[str, str]:
    """Every PromQL the dashboard runs: panel targets and template variable queries."""
    queries = {}
    for panel in walk_panels(dashboard["panels"]):
        for target in panel.get("targets", []):
            queries[f"panel {panel['title']!r} {target['refId']}"] = target["expr"]
    for var in dashboard["templating"]["list"]:
        if var["type"] == "query":
            query = var["query"]
            queries[f"variable {var['name']}"] = query if isinstance(query, str) else query["query"]
    return queries


def alert_queries() -> dict[str, str]:
    config = yaml.safe_load(PROMETHEUS.read_text())
    queries = {}
    for rule_file in config.get("rule_files", []):
        rules = yaml.safe_load((PROMETHEUS.parent / rule_file).read_text())
        for group in rules["groups"]:
            for rule in group["rules"]:
                queries[f"{rule_file} {rule.get('alert') or rule['record']}"] = rule["expr"]
    return queries


def exported_series(text: str) -> set[str]:
    """Series names in a /metrics page: every sample, and what each declared family yields.

    A labelled counter nothing has counted yet (retries, rejections) exports its HELP and TYPE
    lines but no sample; its family type says which series it will have.
    """
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count")}
    names = set()
    for family in text_string_to_metric_families(text):
        names.update(sample.name for sample in family.samples)
        names.update(family.name + s for s in suffixes.get(family.type, ("",)))
    return names


def backend_labelled(text: str) -> set[str]:
    """Series names whose samples carry a backend label."""
    return {
        s.name
        for f in text_string_to_metric_families(text)
        for s in f.samples
        if "backend" in s.labels
    }


@pytest.fixture
def live_metrics(sim_factory: Any, corral_factory: Any) -> tuple[str, set[str]]:
    """A corral over two simulators with GPUs, after a generate, a 404 and a chat."""
    sims = [sim_factory(name=name) for name in ("a", "b")]
    corral = corral_factory(
        [
            {"id": sim.config.name, "url": sim.url, "gpu_metrics_url": f"{sim.url}/_sim/dcgm"}
            for sim in sims
        ],
        gpu={"poll_s": 0.1},
    )
    with httpx.Client(base_url=corral.url, timeout=10) as client:
        generate = {"model": "llama3.2", "prompt": "hi", "stream": False}
        assert client.post("/api/generate", json=generate).status_code == 200
        missing = {"model": "doesnotexist", "prompt": "hi", "stream": False}
        assert client.post("/api/generate", json=missing).status_code == 404
        chat = {"model": "llama3.2", "messages": [{"role": "user", "content": "hi"}]}
        assert client.post("/api/chat", json={**chat, "stream": False}).status_code == 200
        # The GPU poller and the health checker's /api/ps read fill these in shortly after.
        wanted = {"corral_gpu_memory_total_bytes", "corral_model_resident"}
        assert poll(lambda: wanted <= sample_names(client.get("/metrics").text), 10)
        text = client.get("/metrics").text
    return text, sample_names(text)


def sample_names(text: str) -> set[str]:
    return {s.name for f in text_string_to_metric_families(text) for s in f.samples}


def test_dashboard_and_alerts_name_only_series_corral_exports(
    live_metrics: tuple[str, set[str]],
) -> None:
    """Every metric in a dashboard or alert query is one a running corral exports."""
    text, samples = live_metrics
    # What a clustered corral adds: the cluster's own series, and serve --workers' gauges.
    cluster = generate_latest(SimpleNamespace(collect=lambda: ClusterCollector._families(1, 1, 0)))
    clustered = merge([text, cluster], workers=2).decode()
    exported = exported_series(clustered) | PROMETHEUS_SERIES
    panel_queries = dashboard_queries(json.loads(DASHBOARD.read_text()))
    unknown = {}
    for where, expr in (panel_queries | alert_queries()).items():
        names = metric_names(expr)
        assert names, f"{where}: no metric found in {expr!r}"
        if names - exported:
            unknown[where] = sorted(names - exported)
    assert not unknown, f"queries name series corral does not export: {unknown}"
    # Every selector of a series labelled backend= honours the dashboard's backend variable.
    labelled = backend_labelled(text)
    unfiltered = {
        where: expr
        for where, expr in panel_queries.items()
        if where.startswith("panel")
        for name, matchers in _SELECTOR.findall(expr)
        if name in labelled and "$backend" not in matchers
    }
    assert not unfiltered, f'per-backend queries without backend=~"$backend": {unfiltered}'
    # The requests above made the labelled series real, not just declared.
    for name in (
        "corral_requests_total",
        "corral_request_duration_seconds_bucket",
        "corral_time_to_first_token_seconds_bucket",
        "corral_tokens_generated_total",
        "corral_backend_up",
        "corral_gpu_utilization_ratio",
        "corral_model_resident",
    ):
        assert name in samples


def test_dashboard_is_an_importable_grafana_model() -> None:
    """The dashboard loads; every panel has a datasource, a unit and a unique id; rows in order."""
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["schemaVersion"] >= 36
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["DS_PROMETHEUS"]["type"] == "datasource"
    assert variables["DS_PROMETHEUS"]["query"] == "prometheus"
    assert variables["backend"]["multi"] is True
    panels = list(walk_panels(dashboard["panels"]))
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    for panel in panels:
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == "${DS_PROMETHEUS}", panel["title"]
        assert panel["targets"], panel["title"]
        assert panel["fieldConfig"]["defaults"].get("unit"), panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${DS_PROMETHEUS}", panel["title"]
    rows = [p["title"] for p in panels if p["type"] == "row"]
    assert rows == ["Traffic", "Latency", "Capacity & queue", "Health", "GPUs", "Models"]


def test_prometheus_config_scrapes_corral() -> None:
    """prometheus.yml scrapes corral's /metrics on 11434; its rule files exist and parse."""
    config = yaml.safe_load(PROMETHEUS.read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    corral = jobs["corral"]
    assert corral["metrics_path"] == "/metrics"
    targets = [t for static in corral["static_configs"] for t in static["targets"]]
    assert "127.0.0.1:11434" in targets
    assert alert_queries()
