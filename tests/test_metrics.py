"""The Prometheus exporter: collector output, promtool's lint, and a real Prometheus scraping it."""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import math
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import REGISTRY

from prometheus_server import (
    PROMETHEUS,
    PROMTOOL,
    PrometheusServer,
    require_binary,
    sample_value,
    serve_metrics,
)
from spikewatch.service.metrics import (
    COLLECTOR_SOURCES,
    INGEST_OUTCOMES,
    METRIC_NAMES,
    METRICS,
    RUN_STATES,
    SIGNAL_KINDS,
    VERDICT_CAUSES,
    ServiceCollector,
    SinkCounts,
    build_registry,
    render,
)
from spikewatch.service.status import JobStatus, RunStatus

NAN = float("nan")


def run_status(run: str = "r1", **changes: object) -> RunStatus:
    """A fully populated RunStatus; ``changes`` override single fields."""
    base = RunStatus(
        run=run,
        state="active",
        records=120,
        last_step=119,
        last_record_time=1_700_000_000.5,
        loss=2.5,
        grad_norm=0.75,
        lr=3e-4,
        spike_score=1.25,
        signals={"spike": 3, "nonfinite": 1},
        rollbacks=2,
        skipped_steps=4,
        skipped_batches=16,
        incidents_open=1,
        incidents_total=5,
        client_dropped=7,
    )
    return dataclasses.replace(base, **changes)  # type: ignore[arg-type]


def collector_for(*statuses: RunStatus) -> ServiceCollector:
    return ServiceCollector(
        runs=lambda: statuses,
        sinks=lambda: {"slack": SinkCounts(delivered=9, failures=2, dropped=1)},
        jobs=lambda: [
            JobStatus(job="digest", next_run_time=None, last_success_time=1_700_000_100.0, runs=3),
            JobStatus(job="stall_check", next_run_time=None, runs=1, failures=1),
        ],
        ingest=lambda: {"accepted": 40, "unauthorized": 2},
    )


def value(collector: ServiceCollector, name: str, **labels: str) -> float | None:
    return build_registry(collector).get_sample_value(name, labels)


def test_run_gauges_and_counters_are_exported() -> None:
    c = collector_for(run_status())
    expected = {
        "spikewatch_loss": 2.5,
        "spikewatch_grad_norm": 0.75,
        "spikewatch_learning_rate": 3e-4,
        "spikewatch_spike_score": 1.25,
        "spikewatch_last_record_timestamp_seconds": 1_700_000_000.5,
        "spikewatch_last_step": 119.0,
        "spikewatch_incidents_open": 1.0,
        "spikewatch_records_total": 120.0,
        "spikewatch_rollbacks_total": 2.0,
        "spikewatch_skipped_steps_total": 4.0,
        "spikewatch_skipped_batches_total": 16.0,
        "spikewatch_incidents_total": 5.0,
        "spikewatch_client_dropped_records_total": 7.0,
    }
    assert {name: value(c, name, run="r1") for name in expected} == expected


@pytest.mark.parametrize("loss", [NAN, math.inf, -math.inf])
def test_nonfinite_loss_is_exported_as_is(loss: float) -> None:
    got = value(collector_for(run_status(loss=loss)), "spikewatch_loss", run="r1")
    assert got is not None
    assert (math.isnan(got) and math.isnan(loss)) or got == loss
    body, _ = render(build_registry(collector_for(run_status(loss=loss))))
    assert {NAN: b"NaN", math.inf: b"+Inf"}.get(loss, b"-Inf") in body


def test_none_values_are_omitted_not_zero() -> None:
    empty = run_status(
        records=0, last_step=None, last_record_time=None, loss=None, grad_norm=None, lr=None
    )
    c = collector_for(empty)
    for name in (
        "loss",
        "grad_norm",
        "learning_rate",
        "last_step",
        "last_record_timestamp_seconds",
    ):
        assert value(c, f"spikewatch_{name}", run="r1") is None, name
    assert value(c, "spikewatch_records_total", run="r1") == 0.0
    assert value(c, "spikewatch_spike_score", run="r1") == 1.25


def test_every_signal_kind_is_present_from_the_first_scrape() -> None:
    c = collector_for(run_status(signals={"spike": 3}), run_status("r2", signals={}))
    got = {
        (run, kind): value(c, "spikewatch_signals_total", run=run, kind=kind)
        for run in ("r1", "r2")
        for kind in SIGNAL_KINDS
    }
    assert SIGNAL_KINDS == ("nonfinite", "spike", "level_shift", "divergence")
    assert got == {key: (3.0 if key == ("r1", "spike") else 0.0) for key in got}


def test_every_verdict_cause_is_present_from_the_first_scrape() -> None:
    c = collector_for(run_status(verdicts={"data": 2}), run_status("r2"))
    got = {
        (run, cause): value(c, "spikewatch_verdicts_total", run=run, cause=cause)
        for run in ("r1", "r2")
        for cause in VERDICT_CAUSES
    }
    assert VERDICT_CAUSES == ("data", "state", "unknown")
    assert got == {key: (2.0 if key == ("r1", "data") else 0.0) for key in got}


@pytest.mark.parametrize("state", RUN_STATES)
def test_run_state_is_one_hot(state: str) -> None:
    c = collector_for(run_status(state=state))
    got = {s: value(c, "spikewatch_run_state", run="r1", state=s) for s in RUN_STATES}
    assert got == {s: float(s == state) for s in ("active", "stalled", "halted", "finished")}


def test_service_metrics() -> None:
    c = collector_for()
    assert value(c, "spikewatch_up") == 1.0
    sink = {
        kind: value(c, f"spikewatch_sink_{kind}_total", sink="slack")
        for kind in ("deliveries", "failures", "dropped")
    }
    assert sink == {"deliveries": 9.0, "failures": 2.0, "dropped": 1.0}
    ingest = {o: value(c, "spikewatch_ingest_requests_total", outcome=o) for o in INGEST_OUTCOMES}
    assert ingest == {"accepted": 40.0, "rejected": 0.0, "unauthorized": 2.0}
    assert value(c, "spikewatch_job_runs_total", job_id="digest") == 3.0
    assert value(c, "spikewatch_job_failures_total", job_id="stall_check") == 1.0
    last_success = "spikewatch_job_last_success_timestamp_seconds"
    assert value(c, last_success, job_id="digest") == 1_700_000_100.0
    assert value(c, last_success, job_id="stall_check") is None
    errors = {s: value(c, "spikewatch_collector_errors_total", source=s) for s in COLLECTOR_SOURCES}
    assert errors == dict.fromkeys(COLLECTOR_SOURCES, 0.0)


def test_duplicate_run_ids_export_one_series() -> None:
    c = collector_for(run_status(loss=1.0), run_status(loss=2.0))
    body, _ = render(build_registry(c))
    assert body.count(b'spikewatch_loss{run="r1"}') == 1


def _raise() -> Iterator[RunStatus]:
    raise OSError("event store is gone")


@pytest.mark.parametrize("source", COLLECTOR_SOURCES)
def test_a_failing_source_costs_only_its_own_metrics(
    source: str, caplog: pytest.LogCaptureFixture
) -> None:
    c = collector_for(run_status())
    setattr(c, source, _raise)
    registry = build_registry(c)
    with caplog.at_level(logging.WARNING, logger="spikewatch.service.metrics"):
        render(registry)
        body, _ = render(registry)
    assert f'spikewatch_collector_errors_total{{source="{source}"}} 2.0'.encode() in body
    assert c.errors == {s: 2 if s == source else 0 for s in COLLECTOR_SOURCES}
    assert b"spikewatch_up 1.0" in body
    present = {
        "runs": b'spikewatch_loss{run="r1"} 2.5',
        "sinks": b'spikewatch_sink_deliveries_total{sink="slack"} 9.0',
        "jobs": b'spikewatch_job_runs_total{job_id="digest"} 3.0',
        "ingest": b'spikewatch_ingest_requests_total{outcome="accepted"} 40.0',
    }
    assert {s: line in body for s, line in present.items()} == {
        s: s != source for s in COLLECTOR_SOURCES
    }
    assert "event store is gone" in caplog.text
    # The traceback once, then one line per failed scrape.
    assert [bool(r.exc_info) for r in caplog.records] == [True, False]


def test_a_source_failing_midway_exports_no_partial_runs() -> None:
    def half() -> Iterator[RunStatus]:
        yield run_status("r1")
        raise OSError("cursor closed")

    c = collector_for()
    c.runs = half
    assert value(c, "spikewatch_loss", run="r1") is None
    assert c.errors["runs"] == 1


def test_metric_names_match_the_exposition() -> None:
    body, content_type = render(build_registry(collector_for(run_status())))
    help_names = [
        line.split()[2] for line in body.decode().splitlines() if line.startswith("# HELP")
    ]
    assert tuple(help_names) == METRIC_NAMES
    assert content_type.startswith("text/plain; version=")
    assert len(set(METRIC_NAMES)) == len(METRIC_NAMES)
    for spec in METRICS:
        assert spec.name.startswith("spikewatch_"), spec
        assert spec.name.endswith("_total") == (spec.kind == "counter"), spec
        assert not {"step", "job", "instance"} & set(spec.labels), spec
        assert spec.help.endswith("."), spec


def test_registry_is_fresh_and_refuses_a_duplicate_collector() -> None:
    c = collector_for(run_status())
    first, second = build_registry(c), build_registry(c)
    assert first is not second
    assert REGISTRY.get_sample_value("spikewatch_up") is None
    with pytest.raises(ValueError, match="Duplicated timeseries"):
        first.register(collector_for())


def test_promtool_finds_no_problems_in_the_exposition() -> None:
    c = collector_for(run_status(loss=NAN), run_status("r2", state="halted", grad_norm=None))
    body, _ = render(build_registry(c))
    done = subprocess.run(
        [str(require_binary(PROMTOOL)), "check", "metrics"],
        input=body,
        capture_output=True,
        timeout=30,
        check=False,
    )
    assert (done.returncode, done.stdout, done.stderr) == (0, b"", b"")


def test_prometheus_server_reports_why_it_did_not_start(tmp_path: Path) -> None:
    bad_rules = tmp_path / "rules.yml"
    bad_rules.write_text("groups: [{name: g, rules: [{alert: A, expr: 'sum(('}]}]\n")
    with pytest.raises(RuntimeError, match="prometheus exited at start-up") as info:
        PrometheusServer(["127.0.0.1:1"], tmp_path, rule_files=[bad_rules]).start()
    assert "rules.yml" in str(info.value)


@pytest.mark.parametrize("ci", ["", "true"])
def test_a_missing_binary_is_a_skip_that_says_why_and_a_failure_under_ci(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, ci: str
) -> None:
    monkeypatch.setattr("prometheus_server.PROMETHEUS", tmp_path / "prometheus")
    monkeypatch.setenv("CI", ci)
    outcome = pytest.fail.Exception if ci else pytest.skip.Exception
    with pytest.raises(
        outcome, match=r"prometheus is missing: run `bash scripts/install_system\.sh`"
    ):
        PrometheusServer([], tmp_path).start()


def test_real_prometheus_scrapes_the_exporter(tmp_path: Path) -> None:
    require_binary(PROMETHEUS)
    scrapes = itertools.count(1)

    def runs() -> list[RunStatus]:
        # Ten more records per scrape: the scraped counter must grow by exactly 10 each time.
        n = next(scrapes)
        return [run_status(records=10 * n, state="halted"), run_status("r2", loss=NAN)]

    c = collector_for()
    c.runs = runs
    registry = build_registry(c)
    rules = tmp_path / "alerts.yml"
    halted = {"alert": "SpikewatchRunHalted", "expr": 'spikewatch_run_state{state="halted"} == 1'}
    rules.write_text(json.dumps({"groups": [{"name": "spikewatch", "rules": [halted]}]}))
    with (
        serve_metrics(lambda: render(registry)) as target,
        PrometheusServer([target], tmp_path, rule_files=[rules]) as prom,
    ):
        loss = prom.wait_for('spikewatch_loss{run="r1"}', timeout=15)
        assert [(s["metric"]["job"], sample_value(s)) for s in loss] == [("spikewatch", 2.5)]
        assert math.isnan(sample_value(prom.query('spikewatch_loss{run="r2"}')[0]))
        jobs = prom.query('spikewatch_job_runs_total{job_id="digest"}')
        assert [s["metric"]["job"] for s in jobs] == ["spikewatch"]
        rate = prom.wait_for('rate(spikewatch_records_total{run="r1"}[5s]) > 0', timeout=10)
        assert [s["metric"]["run"] for s in rate] == ["r1"]
        scraped = prom.query('spikewatch_records_total{run="r1"}[1m]')[0]["values"]
        steps = {float(b) - float(a) for (_, a), (_, b) in itertools.pairwise(scraped)}
        assert steps == {10.0}
        prom.wait_for('ALERTS{alertname="SpikewatchRunHalted",alertstate="firing"}', timeout=10)
        assert [a["labels"]["run"] for a in prom.alerts()] == ["r1"]
