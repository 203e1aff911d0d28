"""Build the spikewatch Grafana dashboard with grafana-foundation-sdk (the typed models).

The JSON Grafana loads is generated, never edited by hand::

    .venv/bin/python deploy/grafana/dashboard.py      # rewrites dashboards/spikewatch.json

``tests/test_deploy_dashboard.py`` fails while the committed JSON differs from what this
builds, and runs every query below against a real Prometheus scraping a real
``spikewatch serve``. Every series comes from the ``spikewatch`` scrape job; metric names
are those of ``spikewatch.service.metrics.METRIC_NAMES``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from grafana_foundation_sdk.builders import common as common_builders
from grafana_foundation_sdk.builders import dashboard as dash
from grafana_foundation_sdk.builders import prometheus, stat, table, timeseries
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import common, dashboard
from grafana_foundation_sdk.models import prometheus as prometheus_models

OUTPUT = Path(__file__).resolve().parent / "dashboards" / "spikewatch.json"
UID = "spikewatch"
DATASOURCE = dashboard.DataSourceRef(type_val="prometheus", uid="${datasource}")
RUN = 'job="spikewatch", run=~"$run"'
ALL = 'job="spikewatch"'
SPIKE_THRESHOLD = 8.0  # MonitorConfig.threshold's default: where a loss counts as a spike


def query(expr: str, legend: str, ref_id: str, *, instant: bool = False) -> prometheus.Dataquery:
    q = prometheus.Dataquery().expr(expr).legend_format(legend).ref_id(ref_id)
    q = q.datasource(DATASOURCE)
    return q.instant() if instant else q.range()


def table_query(expr: str, ref_id: str) -> prometheus.Dataquery:
    """One column of the runs table: the newest value by run, as a table frame."""
    by_run = f"max by (run) ({expr}{{{ALL}}})"
    return query(by_run, "", ref_id, instant=True).format(prometheus_models.PromQueryFormat.TABLE)


def per_second(counter: str, by: str) -> str:
    """Rate of ``spikewatch_<counter>_total`` summed by one label, over all instances."""
    return f"sum by ({by}) (rate(spikewatch_{counter}_total{{{ALL}}}[$__rate_interval]))"


def increase_by_run(counter: str, selector: str) -> str:
    """How much ``counter`` grew per interval, by run."""
    return f"sum by (run) (increase({counter}{{{selector}}}[$__rate_interval]))"


def thresholds(*steps: tuple[float | None, str]) -> dash.ThresholdsConfig:
    return (
        dash.ThresholdsConfig()
        .mode(dashboard.ThresholdsMode.ABSOLUTE)
        .steps([dashboard.Threshold(value=value, color=color) for value, color in steps])
    )


def graph(title: str, description: str, *queries: prometheus.Dataquery) -> timeseries.Panel:
    legend = (
        common_builders.VizLegendOptions()
        .display_mode(common.LegendDisplayMode.LIST)
        .placement(common.LegendPlacement.BOTTOM)
        .show_legend(True)
    )
    panel = timeseries.Panel().title(title).description(description).datasource(DATASOURCE)
    panel = panel.targets(list(queries)).legend(legend).fill_opacity(10)
    return panel.height(8).span(12)


def counter_bars(title: str, description: str, *queries: prometheus.Dataquery) -> timeseries.Panel:
    return graph(title, description, *queries).draw_style(common.GraphDrawStyle.BARS).min(0)


def single_stat(title: str, description: str, q: prometheus.Dataquery) -> stat.Panel:
    reduce = common_builders.ReduceDataOptions().calcs(["lastNotNull"]).values(False)
    panel = stat.Panel().title(title).description(description).datasource(DATASOURCE)
    panel = panel.with_target(q).reduce_options(reduce).graph_mode(common.BigValueGraphMode.NONE)
    return panel.height(4).span(4)


def overview_stats() -> list[Any]:
    runs_by_state = single_stat(
        "Runs by state",
        "How many runs the service counts as active, stalled (no records for stall_after_s) "
        "and halted.",
        query(f"count by (state) (spikewatch_run_state{{{ALL}}} == 1)", "{{state}}", "A"),
    ).text_mode(common.BigValueTextMode.VALUE_AND_NAME)
    service_up = single_stat(
        "Service scraped",
        "1 while Prometheus scrapes spikewatch; 0 or no value: SpikewatchServiceDown.",
        query(f"min(up{{{ALL}}})", "up", "A"),
    ).thresholds(thresholds((None, "red"), (1.0, "green")))
    return [runs_by_state.span(12), service_up.span(12)]


def runs_table() -> table.Panel:
    columns = {
        "A": ("spikewatch_last_step", "last step"),
        "B": ("time() - spikewatch_last_record_timestamp_seconds", "seconds since last record"),
        "C": ("spikewatch_incidents_open", "open incidents"),
        "D": ("spikewatch_rollbacks_total", "rollbacks"),
    }
    # One instant query per column, merged on `run` into one row per run.
    organize = {
        "excludeByName": {"Time": True},
        "renameByName": {f"Value #{ref}": name for ref, (_, name) in columns.items()},
    }
    return (
        table.Panel()
        .title("Runs")
        .description("Every run the service knows, newest values.")
        .datasource(DATASOURCE)
        .targets([table_query(expr, ref) for ref, (expr, _) in columns.items()])
        .show_header(True)
        .with_transformation(dashboard.DataTransformerConfig(id_val="merge", options={}))
        .with_transformation(dashboard.DataTransformerConfig(id_val="organize", options=organize))
        .height(8)
        .span(24)
    )


def overview_graphs() -> list[Any]:
    loss_all = graph(
        "Loss, all runs",
        "Newest loss of every run (NaN/Inf: gaps).",
        query(f"spikewatch_loss{{{ALL}}}", "{{run}}", "A"),
    )
    incidents_all = counter_bars(
        "Incidents and rollbacks, all runs",
        "Incidents opened and rollbacks applied per interval, by run.",
        query(increase_by_run("spikewatch_incidents_total", ALL), "{{run}} incidents", "A"),
        query(increase_by_run("spikewatch_rollbacks_total", ALL), "{{run}} rollbacks", "B"),
    )
    service = graph(
        "Service: ingest, Slack and jobs",
        "Per second: ingest requests by outcome, Slack messages delivered and failed or "
        "dropped, failed scheduled jobs.",
        query(per_second("ingest_requests", "outcome"), "ingest {{outcome}}", "A"),
        query(per_second("sink_deliveries", "sink"), "{{sink}} delivered", "B"),
        query(
            f"{per_second('sink_failures', 'sink')} + {per_second('sink_dropped', 'sink')}",
            "{{sink}} failed or dropped",
            "C",
        ),
        query(per_second("job_failures", "job_id"), "job {{job_id}} failed", "D"),
    )
    return [loss_all, incidents_all, service.unit("ops").span(24)]


def run_stats() -> list[Any]:
    state = single_stat(
        "State",
        "active, stalled (no records for stall_after_s) or halted (policy or operator).",
        query(f"spikewatch_run_state{{{RUN}}} == 1", "{{run}}: {{state}}", "A"),
    ).text_mode(common.BigValueTextMode.NAME)
    since = (
        single_stat(
            "Time since last record",
            "Seconds since the service received the run's newest record; SpikewatchRunStalled "
            "fires past 600 s.",
            query(f"time() - spikewatch_last_record_timestamp_seconds{{{RUN}}}", "{{run}}", "A"),
        )
        .unit("s")
        .thresholds(thresholds((None, "green"), (300.0, "yellow"), (600.0, "red")))
    )
    totals = [
        ("Rollbacks", "spikewatch_rollbacks_total", "Rollbacks the trainer applied."),
        ("Skipped batches", "spikewatch_skipped_batches_total", "Batches skipped by rollbacks."),
        (
            "Skipped steps",
            "spikewatch_skipped_steps_total",
            "Optimizer steps skipped (NaN, huge norm).",
        ),
        ("Open incidents", "spikewatch_incidents_open", "Incidents not yet confirmed or closed."),
    ]
    counts = [
        single_stat(title, help_, query(f"{name}{{{RUN}}}", "{{run}}", "A"))
        for title, name, help_ in totals
    ]
    return [state, since, *counts]


def run_curves() -> list[Any]:
    loss = graph(
        "Loss",
        "The run's newest loss per scrape; annotations mark incidents, rollbacks and "
        "skipped steps.",
        query(f"spikewatch_loss{{{RUN}}}", "{{run}}", "A"),
    )
    grad = graph(
        "Gradient norm (pre-clip)",
        "The pre-clip gradient L2 norm the trainer reported.",
        query(f"spikewatch_grad_norm{{{RUN}}}", "{{run}}", "A"),
    )
    score = graph(
        "Spike score",
        "Robust z-score of the newest loss at each scrape (a spike inside a batch between "
        f"two scrapes shows in Signals by kind); above {SPIKE_THRESHOLD:g}, the default "
        "threshold, a loss is a spike.",
        query(f"spikewatch_spike_score{{{RUN}}}", "{{run}}", "A"),
    ).thresholds(thresholds((None, "green"), (SPIKE_THRESHOLD, "red")))
    line = common_builders.GraphThresholdsStyleConfig().mode(common.GraphTresholdsStyleMode.LINE)
    return [loss, grad, score.thresholds_style(line)]


def run_counters() -> list[Any]:
    signals = counter_bars(
        "Signals by kind",
        "Detector signals per interval: spike, level_shift, divergence, nonfinite.",
        query(
            f"sum by (run, kind) (increase(spikewatch_signals_total{{{RUN}}}[$__rate_interval]))",
            "{{run}} {{kind}}",
            "A",
        ),
    )
    actions = counter_bars(
        "Rollbacks, skipped batches and steps",
        "What the watchdog made the trainer do, per interval.",
        query(increase_by_run("spikewatch_rollbacks_total", RUN), "{{run}} rollbacks", "A"),
        query(increase_by_run("spikewatch_skipped_batches_total", RUN), "{{run}} batches", "B"),
        query(increase_by_run("spikewatch_skipped_steps_total", RUN), "{{run}} steps", "C"),
    )
    throughput = graph(
        "Records and learning rate",
        "Records ingested and dropped by the client per second (left); learning rate (right).",
        query(f"rate(spikewatch_records_total{{{RUN}}}[$__rate_interval])", "{{run}} records", "A"),
        query(
            f"rate(spikewatch_client_dropped_records_total{{{RUN}}}[$__rate_interval])",
            "{{run}} dropped",
            "B",
        ),
        query(f"spikewatch_learning_rate{{{RUN}}}", "{{run}} lr", "C"),
    )
    right_axis = [
        dashboard.DynamicConfigValue(id_val="custom.axisPlacement", value="right"),
        dashboard.DynamicConfigValue(id_val="unit", value="none"),
    ]
    return [signals, actions, throughput.override_by_query("C", right_axis)]


def annotation(name: str, metric: str, color: str) -> dash.AnnotationQuery:
    # A counter that changed within the last minute marks the time of the event.
    return (
        dash.AnnotationQuery()
        .name(name)
        .datasource(DATASOURCE)
        .enable(True)
        .icon_color(color)
        .expr(f"changes({metric}{{{RUN}}}[1m]) > 0")
    )


def variables() -> list[Any]:
    source = dash.DatasourceVariable("datasource").label("Prometheus").type("prometheus")
    run = (
        dash.QueryVariable("run")
        .label("Run")
        .datasource(DATASOURCE)
        .query(f"label_values(spikewatch_records_total{{{ALL}}}, run)")
        .refresh(dashboard.VariableRefresh.ON_TIME_RANGE_CHANGED)
        .sort(dashboard.VariableSort.ALPHABETICAL_ASC)
        .multi(True)
        .include_all(True)
    )
    return [source, run]


def build() -> dashboard.Dashboard:
    """The dashboard model: an overview of every run, then the selected runs in detail."""
    board = (
        dash.Dashboard("spikewatch")
        .uid(UID)
        .description("Loss spikes, rollbacks and health of training runs watched by spikewatch.")
        .tags(["spikewatch", "training"])
        .time("now-6h", "now")
        .refresh("30s")
        .timezone("browser")
        .tooltip(dashboard.DashboardCursorSync.CROSSHAIR)
        .variables(variables())
        .annotations(
            [
                annotation("Incidents", "spikewatch_incidents_total", "red"),
                annotation("Rollbacks", "spikewatch_rollbacks_total", "orange"),
                annotation("Skipped steps", "spikewatch_skipped_steps_total", "purple"),
            ]
        )
    )
    board = board.with_row(dash.Row("All runs"))
    for panel in [*overview_stats(), runs_table(), *overview_graphs()]:
        board = board.with_panel(panel)
    board = board.with_row(dash.Row("Run $run"))
    for panel in [*run_stats(), *run_curves(), *run_counters()]:
        board = board.with_panel(panel)
    model = board.build()
    for number, panel in enumerate(model.panels or [], start=1):
        panel.id_val = number  # unique ids: Grafana's links and annotation filters use them
    return model


def to_json(model: dashboard.Dashboard) -> str:
    """The dashboard as Grafana's JSON model (stable key order, a trailing newline)."""
    return json.dumps(model, cls=JSONEncoder, indent=2, sort_keys=True) + "\n"


def main(argv: list[str]) -> int:
    """Write the dashboard JSON (``--check``: only report whether it is up to date)."""
    text = to_json(build())
    if "--check" in argv:
        current = OUTPUT.read_text() if OUTPUT.exists() else ""
        return 0 if current == text else 1
    OUTPUT.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
