"""deploy/grafana: the dashboard as a Grafana model, and every query of it on real data.

No Grafana server is installable here, so the dashboard is checked in two halves: its JSON
decodes into grafana-foundation-sdk's typed models and re-encodes unchanged (a misspelt
key or a wrong type does not survive that), and every panel target, annotation and
variable query runs against a real Prometheus — configured from
deploy/prometheus/prometheus.yml and loaded with deploy/prometheus/alerts.yml — scraping
a real ``spikewatch serve`` that was fed a spiking run over HTTP.
"""

from __future__ import annotations

import importlib.util
import json
import math
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import pytest
import yaml
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.cog.plugins import register_default_plugins
from grafana_foundation_sdk.models import prometheus as prometheus_models
from grafana_foundation_sdk.models.dashboard import Dashboard, Panel

from deploy_stack import (
    BATCH,
    DEPLOY,
    PROMETHEUS_CONFIG,
    SCRAPE_INTERVAL_S,
    DeployedPrometheus,
    TrainerClient,
    service_config,
    service_env,
    spike_roll_back_and_nan,
)
from prometheus_server import PrometheusServer, Sample
from service_client import HEALTHY, ONSET, SLACK_TOKEN, SPIKING
from service_process import ServiceProcess
from slack_emulator import SlackEmulator, running_emulator
from spikewatch.service.metrics import METRIC_NAMES

BUILDER = DEPLOY / "grafana" / "dashboard.py"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "spikewatch.json"
PROVISIONING = DEPLOY / "grafana" / "provisioning"

SPIKE_RUN = "llm:gpt-spike"
"""Healthy until `ONSET`, then a jump: an incident, a rollback, then one NaN loss."""
HEALTHY_RUN = "llm:gpt-ok"
SCRATCH_RUN = "scratch-try"
"""Dropped by the scrape config's metric relabelling: never stored."""
# Grafana's $__rate_interval: max($__interval + scrape interval, 4 x scrape interval).
RATE_INTERVAL = f"{4 * SCRAPE_INTERVAL_S}s"
_LEGEND_LABEL = re.compile(r"\{\{\s*(\w+)\s*\}\}")
_METRIC = re.compile(r"\b(spikewatch_[a-z_]+|up)\b")


def load_dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return data


def load_builder() -> ModuleType:
    """deploy/grafana/dashboard.py, imported from its path (deploy/ is not a package)."""
    spec = importlib.util.spec_from_file_location("spikewatch_dashboard_builder", BUILDER)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def panels() -> list[dict[str, Any]]:
    return [p for p in load_dashboard()["panels"] if p["type"] != "row"]


def all_queries() -> list[tuple[str, dict[str, Any]]]:
    """(where, query) for every panel target and annotation of the dashboard."""
    queries = [
        (f"panel {p['title']!r} target {t['refId']}", t) for p in panels() for t in p["targets"]
    ]
    queries += [(f"annotation {a['name']!r}", a) for a in load_dashboard()["annotations"]["list"]]
    return queries


# -- the dashboard as a model ------------------------------------------------------------
def test_the_committed_json_is_what_the_builder_builds() -> None:
    builder = load_builder()
    assert builder.to_json(builder.build()) == DASHBOARD.read_text(), (
        "deploy/grafana/dashboards/spikewatch.json is stale: "
        "run `.venv/bin/python deploy/grafana/dashboard.py`"
    )


def test_the_json_decodes_into_grafana_models_and_back_unchanged() -> None:
    register_default_plugins()
    data = load_dashboard()
    model = Dashboard.from_json(data)
    assert json.loads(json.dumps(model, cls=JSONEncoder)) == data
    decoded = [p for p in model.panels or [] if isinstance(p, Panel)]
    assert len(decoded) == len(panels())
    for panel in decoded:
        # Options decode into the panel plugin's typed model, targets into Prometheus's.
        assert type(panel.options).__module__.endswith(f"models.{panel.type_val}"), panel.title
        assert panel.targets
        assert all(isinstance(t, prometheus_models.Dataquery) for t in panel.targets)


def test_panels_are_laid_out_and_wired_to_the_variables() -> None:
    data = load_dashboard()
    ids = [p["id"] for p in data["panels"]]
    assert len(set(ids)) == len(ids)
    occupied: set[tuple[int, int]] = set()
    for p in data["panels"]:
        pos = p["gridPos"]
        assert pos["x"] >= 0 and pos["x"] + pos["w"] <= 24, p["title"]
        cells = {(pos["x"] + dx, pos["y"] + dy) for dx in range(pos["w"]) for dy in range(pos["h"])}
        assert not cells & occupied, f"{p['title']!r} overlaps another panel"
        occupied |= cells
    variables = {v["name"]: v for v in data["templating"]["list"]}
    assert variables["datasource"]["query"] == "prometheus"
    assert variables["run"]["datasource"]["uid"] == "${datasource}"
    for where, q in all_queries():
        assert q["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, where
        used = set(re.findall(r"\$(\w+)", q["expr"])) - {"__rate_interval"}
        assert used <= set(variables), (where, used)
        assert 'job="spikewatch"' in q["expr"], where


def test_queries_use_only_exported_metrics() -> None:
    exprs = [q["expr"] for _, q in all_queries()]
    exprs += [v["query"] for v in load_dashboard()["templating"]["list"]]
    used = {name for expr in exprs for name in _METRIC.findall(expr)}
    assert sorted(used - set(METRIC_NAMES) - {"up"}) == []
    for name in (
        "spikewatch_loss",
        "spikewatch_grad_norm",
        "spikewatch_spike_score",
        "spikewatch_rollbacks_total",
        "spikewatch_skipped_batches_total",
        "spikewatch_skipped_steps_total",
        "spikewatch_last_record_timestamp_seconds",
        "spikewatch_incidents_total",
    ):
        assert name in used, name


def test_provisioning_serves_this_dashboard_from_a_prometheus_source() -> None:
    (provider,) = yaml.safe_load((PROVISIONING / "dashboards" / "spikewatch.yml").read_text())[
        "providers"
    ]
    assert provider["type"] == "file"
    assert provider["options"]["path"].endswith("/spikewatch")
    (source,) = yaml.safe_load((PROVISIONING / "datasources" / "prometheus.yml").read_text())[
        "datasources"
    ]
    assert source["type"] == "prometheus"
    scrape = yaml.safe_load(PROMETHEUS_CONFIG.read_text())["global"]["scrape_interval"]
    assert source["jsonData"]["timeInterval"] == scrape


# -- a real service, a real Prometheus, a spiking run ------------------------------------
@dataclass
class Stack:
    """What the spiking-run scenario leaves running for the tests to query."""

    service: ServiceProcess
    prometheus: DeployedPrometheus
    emulator: SlackEmulator
    started: float


def feed_runs(service: ServiceProcess, prometheus: PrometheusServer) -> None:
    """Healthy history first (scraped before the spike, so counters are seen changing)."""
    trainers = {run: TrainerClient(service, run) for run in (SPIKE_RUN, HEALTHY_RUN, SCRATCH_RUN)}
    for start in range(0, ONSET, BATCH):
        for trainer in trainers.values():
            trainer.send(HEALTHY, start, start + BATCH)
    prometheus.wait_for(f'spikewatch_records_total{{run="{SPIKE_RUN}"}} >= {ONSET}', timeout=20)
    last = spike_roll_back_and_nan(trainers[SPIKE_RUN], prometheus)
    trainers[HEALTHY_RUN].send(HEALTHY, ONSET, last + 1)
    fed = time.time()
    prometheus.wait_for('spikewatch_sink_deliveries_total{sink="slack"} >= 1', timeout=15)
    # Two more scrapes, so every rate window holds two samples after the last change.
    prometheus.wait_for(f"timestamp(spikewatch_up) > {fed + 2 * SCRAPE_INTERVAL_S:.3f}")


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    tmp_path = tmp_path_factory.mktemp("deploy-dashboard")
    with running_emulator(token=SLACK_TOKEN) as emulator:
        service = ServiceProcess(tmp_path, config=service_config(emulator), env=service_env())
        with service:
            target = service.url.removeprefix("http://")
            prometheus = DeployedPrometheus([target], tmp_path)
            with prometheus:
                started = time.time()
                prometheus.wait_for('up{job="spikewatch"} == 1', timeout=15)
                feed_runs(service, prometheus)
                yield Stack(service, prometheus, emulator, started)


def grafana_regex(values: tuple[str, ...]) -> str:
    """A variable's value inside ``=~"..."``, as Grafana's Prometheus source writes it:
    regex characters escaped (twice: once for the regex, once for the PromQL string),
    several values as an alternation."""
    escaped = [re.sub(r"[\\^$*+?.()|{}\[\]]", lambda m: "\\\\" + m.group(), v) for v in values]
    return escaped[0] if len(escaped) == 1 else f"({'|'.join(escaped)})"


def grafana_expr(expr: str, runs: tuple[str, ...]) -> str:
    """Substitute the dashboard variables and Grafana's macros as Grafana would."""
    expr = expr.replace("$__rate_interval", RATE_INTERVAL).replace("$run", grafana_regex(runs))
    assert "$" not in expr, f"unsubstituted variable in {expr!r}"
    return expr


def run_query(
    stack: Stack, q: dict[str, Any], runs: tuple[str, ...] = (SPIKE_RUN,)
) -> list[dict[str, Any]]:
    """The query as Grafana sends it: instant at now, else a range over the test's data."""
    expr = grafana_expr(q["expr"], runs)
    if q.get("instant"):
        return stack.prometheus.query(expr)
    data = stack.prometheus.api(
        "query_range",
        query=expr,
        start=f"{stack.started:.3f}",
        end=f"{time.time():.3f}",
        step=f"{SCRAPE_INTERVAL_S}s",
    )
    result: list[dict[str, Any]] = data["result"]
    return result


def values_of(series: dict[str, Any]) -> list[float]:
    points = series["values"] if "values" in series else [series["value"]]
    return [float(v) for _, v in points]


def test_every_panel_and_annotation_query_returns_data(stack: Stack) -> None:
    problems = []
    for where, q in all_queries():
        result = run_query(stack, q)
        if not result:
            problems.append(f"{where}: no data for {q['expr']}")
            continue
        if not any(not math.isnan(v) for s in result for v in values_of(s)):
            problems.append(f"{where}: only NaN for {q['expr']}")
        # A legend naming a label the query aggregated away would show blank names.
        for label in _LEGEND_LABEL.findall(q.get("legendFormat", "")):
            if not all(label in s["metric"] for s in result):
                problems.append(f"{where}: legend label {label!r} missing in {result[0]}")
    assert problems == []


def test_the_run_variable_lists_runs_and_the_relabelling_applies(stack: Stack) -> None:
    variable = next(v for v in load_dashboard()["templating"]["list"] if v["name"] == "run")
    match = re.fullmatch(r"label_values\((.+), (\w+)\)", variable["query"])
    assert match is not None, variable["query"]
    selector, label = match.groups()
    values = stack.prometheus.api(f"label/{label}/values", **{"match[]": selector})
    assert sorted(values) == [HEALTHY_RUN, SPIKE_RUN]  # the scratch run was dropped
    projects = stack.prometheus.query(f'spikewatch_loss{{run="{SPIKE_RUN}"}}')
    assert [s["metric"]["project"] for s in projects] == ["llm"]


def panel_query(title: str) -> dict[str, Any]:
    (target,) = next(p for p in panels() if p["title"] == title)["targets"]
    return dict(target)


def newest(result: list[Sample]) -> dict[str, float]:
    return {s["metric"]["run"]: values_of(s)[-1] for s in result}


def test_the_panels_show_the_spike_and_what_the_watchdog_did(stack: Stack) -> None:
    both = (SPIKE_RUN, HEALTHY_RUN)
    rollbacks = newest(run_query(stack, panel_query("Rollbacks"), runs=both))
    assert rollbacks == {SPIKE_RUN: 1.0, HEALTHY_RUN: 0.0}
    skipped = newest(run_query(stack, panel_query("Skipped steps"), runs=both))
    assert skipped == {SPIKE_RUN: 1.0, HEALTHY_RUN: 0.0}
    batches = newest(run_query(stack, panel_query("Skipped batches"), runs=both))
    assert batches[SPIKE_RUN] > 0 and batches[HEALTHY_RUN] == 0
    # The jump itself: the newest loss of the batch that held it, as scraped.
    (loss,) = run_query(stack, panel_query("Loss"))
    assert max(values_of(loss)) == pytest.approx(SPIKING[ONSET + BATCH - 1], abs=1e-9)
    since = newest(run_query(stack, panel_query("Time since last record"), runs=both))
    assert all(0 <= s < 60 for s in since.values())
    for annotation in load_dashboard()["annotations"]["list"]:
        marked = {s["metric"]["run"] for s in run_query(stack, annotation, runs=both)}
        assert marked == {SPIKE_RUN}, annotation["name"]


def firing(stack: Stack) -> set[tuple[str, str]]:
    alerts = stack.prometheus.alerts()
    return {(a["labels"]["alertname"], a["labels"].get("run", "")) for a in alerts}


def test_the_deployed_rules_fire_on_the_spiking_run_only(stack: Stack) -> None:
    expected = {
        ("SpikewatchSpikeDetected", SPIKE_RUN),
        ("SpikewatchRollback", SPIKE_RUN),
        ("SpikewatchNonFiniteLoss", SPIKE_RUN),
    }
    deadline = time.monotonic() + 10
    while not expected <= firing(stack) and time.monotonic() < deadline:
        time.sleep(0.25)
    assert firing(stack) == expected
    rules = [r for g in stack.prometheus.rule_groups() for r in g["rules"]]
    assert {(r["name"], r["health"], r.get("lastError", "")) for r in rules} == {
        (r["name"], "ok", "") for r in rules
    }
