"""deploy/prometheus: promtool checks, the alert unit tests, and that they can fail.

The alert rules are what on-call people see at 3 a.m.; here they are held to what the
service exports (metric names, label values) and every alert's unit tests are shown to
catch both a rule that never fires and one that always does.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from prometheus_server import PROMTOOL, require_binary
from spikewatch.service.config import ServiceConfig
from spikewatch.service.metrics import (
    COLLECTOR_SOURCES,
    METRIC_NAMES,
    METRICS,
    RUN_STATES,
    SIGNAL_KINDS,
    VERDICT_CAUSES,
)

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
CONFIG = DEPLOY / "prometheus" / "prometheus.yml"
RULES = DEPLOY / "prometheus" / "alerts.yml"
RULE_TESTS = DEPLOY / "prometheus" / "tests" / "alerts_test.yml"
KUBERNETES = DEPLOY / "kubernetes"
SEVERITIES = ("info", "warning", "critical")
# Series Prometheus makes itself; everything else must come from spikewatch's exporter.
PROMETHEUS_NAMES = frozenset({"up"})


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


# Label values the rules may match, by label: what the exporter can emit.
LABEL_VALUES: dict[str, tuple[str, ...]] = {
    "kind": SIGNAL_KINDS,
    "cause": VERDICT_CAUSES,
    "state": RUN_STATES,
    "source": COLLECTOR_SOURCES,
    "sink": ("slack",),
    "job": (load_yaml(CONFIG)["scrape_configs"][0]["job_name"],),
}
_NAME = re.compile(r"\b(spikewatch_[a-z_]+|up)\b")
_MATCHER = re.compile(r'\b([a-z_]+)\s*(=~|!~|!=|=)\s*"([^"]*)"')
_GROUPING = re.compile(r"\b(?:on|by|without|ignoring)\s*\(([^)]*)\)")


def alert_rules() -> list[dict[str, Any]]:
    groups = load_yaml(RULES)["groups"]
    return [rule for group in groups for rule in group["rules"] if "alert" in rule]


ALERTS = [rule["alert"] for rule in alert_rules()]


def promtool(*args: str | Path) -> subprocess.CompletedProcess[str]:
    """Run promtool; its output goes into the assertion message when it fails."""
    binary = require_binary(PROMTOOL)
    return subprocess.run(
        [str(binary), *map(str, args)], capture_output=True, text=True, timeout=30, check=False
    )


def test_promtool_accepts_the_scrape_config_and_its_rule_files() -> None:
    done = promtool("check", "config", CONFIG)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"SUCCESS: {len(ALERTS)} rules found" in done.stdout


def test_promtool_accepts_the_rules() -> None:
    done = promtool("check", "rules", RULES)
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_alert_unit_tests_pass() -> None:
    done = promtool("test", "rules", RULE_TESTS)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout


def test_every_alert_has_a_firing_case_and_a_quiet_case() -> None:
    firing: set[str] = set()
    quiet: set[str] = set()
    for case in load_yaml(RULE_TESTS)["tests"]:
        for check in case.get("alert_rule_test", []):
            (firing if check.get("exp_alerts") else quiet).add(check["alertname"])
    assert sorted(set(ALERTS) - firing) == [], "alerts without a test where they fire"
    assert sorted(set(ALERTS) - quiet) == [], "alerts without a test where they stay quiet"
    assert sorted((firing | quiet) - set(ALERTS)) == [], "tests of alerts that do not exist"


@pytest.mark.parametrize("rule", alert_rules(), ids=ALERTS)
def test_every_alert_says_how_bad_it_is_and_what_to_look_at(rule: dict[str, Any]) -> None:
    assert rule["alert"].startswith("Spikewatch")
    assert rule["labels"] == {"service": "spikewatch", "severity": rule["labels"]["severity"]}
    assert rule["labels"]["severity"] in SEVERITIES
    annotations = rule["annotations"]
    assert sorted(annotations) == ["description", "summary"]
    assert len(annotations["summary"]) <= 80, "a summary is one line in Slack"
    # A description tells where to look: an endpoint, a panel, a command or a log.
    assert len(annotations["description"]) >= 150
    assert re.search(r"/v1/|/healthz|panel|log|silence", annotations["description"])


def series_in_tests() -> list[str]:
    cases = load_yaml(RULE_TESTS)["tests"]
    return [series["series"] for case in cases for series in case["input_series"]]


def rule_exprs() -> list[str]:
    return [rule["expr"] for rule in alert_rules()]


def test_rules_and_their_tests_use_only_exported_metrics() -> None:
    used = {name for expr in rule_exprs() + series_in_tests() for name in _NAME.findall(expr)}
    assert sorted(used - set(METRIC_NAMES) - PROMETHEUS_NAMES) == []
    # Every run-level family that can break a run is watched by some rule.
    watched = {name for rule in alert_rules() for name in _NAME.findall(rule["expr"])}
    for name in (
        "spikewatch_signals_total",
        "spikewatch_rollbacks_total",
        "spikewatch_run_state",
        "spikewatch_loss",
        "spikewatch_last_record_timestamp_seconds",
        "spikewatch_sink_failures_total",
    ):
        assert name in watched, name


def check_matchers(expr: str, checked_values: dict[str, tuple[str, ...]]) -> None:
    exported = {label for spec in METRICS for label in spec.labels} | {"job", "instance"}
    for label, op, value in _MATCHER.findall(expr):
        assert label in exported, (label, expr)
        if label in checked_values and op in ("=", "=~"):
            for alternative in value.split("|"):
                assert alternative in checked_values[label], (label, alternative, expr)
    for grouping in _GROUPING.findall(expr):
        labels = {label.strip() for label in grouping.split(",") if label.strip()}
        assert labels <= exported, (labels, expr)


def test_rules_match_only_labels_and_values_the_exporter_emits() -> None:
    for expr in rule_exprs():
        check_matchers(expr, LABEL_VALUES)
    # The tests may hold other jobs' series, to show that the rules ignore them.
    others = {label: values for label, values in LABEL_VALUES.items() if label != "job"}
    for series in series_in_tests():
        check_matchers(series, others)


def mutated_copy(tmp_path: Path, alert: str, expr: str) -> Path:
    """alerts.yml with ``alert``'s expression replaced, beside a copy of the tests."""
    rules = load_yaml(RULES)
    for group in rules["groups"]:
        for rule in group["rules"]:
            if rule.get("alert") == alert:
                rule["expr"] = expr
    (tmp_path / "tests").mkdir()
    (tmp_path / "alerts.yml").write_text(yaml.safe_dump(rules, sort_keys=False))
    return Path(shutil.copy(RULE_TESTS, tmp_path / "tests" / RULE_TESTS.name))


# A rule that never fires breaks the firing cases; one that fires on every series breaks
# the quiet ones. Either way `promtool test rules` must fail, naming the alert.
MUTATIONS = {
    "never-fires": "vector(1) == 0",
    # label_replace keeps series of different names apart once the name is dropped.
    "fires-on-everything": (
        'label_replace({__name__=~"spikewatch_.+|up"}, "series", "$1", "__name__", "(.+)")'
    ),
}


@pytest.mark.parametrize("alert", ALERTS)
@pytest.mark.parametrize("mutation", sorted(MUTATIONS))
def test_the_unit_tests_catch_a_broken_rule(tmp_path: Path, alert: str, mutation: str) -> None:
    tests = mutated_copy(tmp_path, alert, MUTATIONS[mutation])
    done = promtool("test", "rules", tests)
    assert done.returncode != 0, f"the tests of {alert} pass although it {mutation}"
    assert f"alertname: {alert}," in done.stdout + done.stderr


# -- the scrape setups the rules rely on ------------------------------------------------------
def camel_case(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part.title() for part in rest)


@pytest.mark.parametrize("monitor", ["servicemonitor.yaml", "podmonitor.yaml"])
def test_kubernetes_monitors_scrape_like_the_scrape_config(monitor: str) -> None:
    """Same job name (what SpikewatchServiceDown and the dashboard select) and relabelling."""
    (job,) = load_yaml(CONFIG)["scrape_configs"]
    manifest = load_yaml(KUBERNETES / monitor)
    (endpoint,) = manifest["spec"].get("endpoints") or manifest["spec"]["podMetricsEndpoints"]
    expected = [
        {camel_case(k): v for k, v in rule.items()} for rule in job["metric_relabel_configs"]
    ]
    assert endpoint["metricRelabelings"] == expected
    assert (endpoint["path"], endpoint["interval"]) == (job["metrics_path"], job["scrape_interval"])
    service = load_yaml(KUBERNETES / "service.yaml")
    if manifest["kind"] == "ServiceMonitor":  # the job label is the Service's name
        assert service["metadata"]["name"] == job["job_name"]
    else:  # the job label is the value of the pod label named by jobLabel
        pod = load_yaml(KUBERNETES / "deployment.yaml")["spec"]["template"]["metadata"]
        assert pod["labels"][manifest["spec"]["jobLabel"]] == job["job_name"]


def test_kubernetes_manifests_agree_on_names_ports_and_config() -> None:
    manifests = {path.name: load_yaml(path) for path in sorted(KUBERNETES.glob("*.yaml"))}
    for name, manifest in manifests.items():
        if manifest["kind"] not in ("Kustomization", "Namespace"):
            assert manifest["metadata"]["namespace"] == "spikewatch", name
    # kubectl apply -k takes everything but the example Secret and the operator's CRDs.
    not_applied = {"kustomization.yaml", "secret.example.yaml"}
    not_applied |= {"servicemonitor.yaml", "podmonitor.yaml"}
    assert sorted(manifests["kustomization.yaml"]["resources"]) == sorted(
        set(manifests) - not_applied
    )
    pod = manifests["deployment.yaml"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["ports"] == [{"name": "http", "containerPort": 9650}]
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    secret_keys = {
        item["key"] for v in pod["volumes"] if "secret" in v for item in v["secret"]["items"]
    }
    assert secret_keys <= set(manifests["secret.example.yaml"]["stringData"])
    toml_text = manifests["configmap.yaml"]["data"]["service.toml"]
    config = ServiceConfig.from_mapping(tomllib.loads(toml_text))
    assert (config.host, config.port) == ("0.0.0.0", 9650)
    dockerfile = (DEPLOY / "docker" / "Dockerfile").read_text()
    assert "EXPOSE 9650" in dockerfile and "/healthz" in dockerfile
