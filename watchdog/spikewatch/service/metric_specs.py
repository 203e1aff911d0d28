"""The metric families the service exports: names, kinds, labels, help (no collection).

`spikewatch.service.metrics` collects them; deploy rules and dashboards may use only
`METRIC_NAMES` (tests check it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily

from spikewatch.forensics.verdict import CAUSES
from spikewatch.records import SignalKind
from spikewatch.service.status import RunState

SIGNAL_KINDS: tuple[str, ...] = get_args(SignalKind)
"""Values of the ``kind`` label of ``spikewatch_signals_total`` (always all exported)."""
VERDICT_CAUSES: tuple[str, ...] = CAUSES
"""Values of the ``cause`` label of ``spikewatch_verdicts_total`` (always all exported)."""
RUN_STATES: tuple[str, ...] = get_args(RunState)
"""Values of the ``state`` label of ``spikewatch_run_state`` (one-hot per run)."""
INGEST_OUTCOMES: tuple[str, ...] = ("accepted", "rejected", "unauthorized")
"""Values of the ``outcome`` label of ``spikewatch_ingest_requests_total``."""
COLLECTOR_SOURCES: tuple[str, ...] = ("runs", "sinks", "jobs", "ingest")
# Scheduled jobs are labelled ``job_id``, not ``job``: Prometheus owns ``job`` (the scrape
# job) and would rename ours to ``exported_job``.
"""Values of the ``source`` label of ``spikewatch_collector_errors_total``."""


@dataclass(frozen=True, slots=True, kw_only=True)
class SinkCounts:
    """What one sink (Slack, event store, ...) has done since the service started.

    Attributes:
        delivered: messages the sink delivered.
        failures: delivery attempts that failed (after retries).
        dropped: messages dropped without an attempt (queue full, rate limit).
        outbox_messages: messages waiting in the sink's outbox (None: no outbox).
        outbox_oldest_age_s: how long the oldest of them has waited (0 when none).
    """

    delivered: int = 0
    failures: int = 0
    dropped: int = 0
    outbox_messages: int | None = None
    outbox_oldest_age_s: float | None = None


@dataclass(frozen=True, slots=True)
class MetricSpec:
    """One exported metric family, as Prometheus sees it.

    Attributes:
        name: the exposed sample name (counters end in ``_total``).
        kind: ``gauge`` or ``counter``.
        labels: label names.
        help: the HELP text: what it measures and in which unit.
    """

    name: str
    kind: Literal["gauge", "counter"]
    labels: tuple[str, ...]
    help: str

    def family(self) -> GaugeMetricFamily | CounterMetricFamily:
        """An empty metric family for this spec (the client drops ``_total`` internally)."""
        if self.kind == "counter":
            return CounterMetricFamily(self.name, self.help, labels=self.labels)
        return GaugeMetricFamily(self.name, self.help, labels=self.labels)


def _spec(name: str, labels: str, help_: str) -> MetricSpec:
    kind: Literal["gauge", "counter"] = "counter" if name.endswith("_total") else "gauge"
    return MetricSpec(name, kind, tuple(labels.split()), help_)


METRICS: tuple[MetricSpec, ...] = (
    _spec("spikewatch_loss", "run", "Newest loss of the run, loss units; NaN/+Inf if non-finite."),
    _spec("spikewatch_grad_norm", "run", "Newest pre-clip gradient L2 norm reported by the run."),
    _spec("spikewatch_learning_rate", "run", "Newest learning rate reported by the run."),
    _spec("spikewatch_spike_score", "run", "Robust z-score of the newest loss (robust std devs)."),
    _spec(
        "spikewatch_last_record_timestamp_seconds",
        "run",
        "Unix time (seconds) of the newest record.",
    ),
    _spec("spikewatch_last_step", "run", "Training step of the run's newest record, in steps."),
    _spec("spikewatch_incidents_open", "run", "Incidents of the run not yet confirmed or closed."),
    _spec("spikewatch_records_total", "run", "Step records ingested for the run."),
    _spec("spikewatch_rollbacks_total", "run", "Rollbacks decided for the run."),
    _spec("spikewatch_skipped_steps_total", "run", "Optimizer steps the run was told to skip."),
    _spec(
        "spikewatch_skipped_batches_total", "run", "Batches skipped by rollbacks (trainer count)."
    ),
    _spec("spikewatch_incidents_total", "run", "Incidents opened for the run."),
    _spec(
        "spikewatch_client_dropped_records_total", "run", "Records the client dropped (queue full)."
    ),
    _spec("spikewatch_run_state", "run state", "1 for the run's current state, 0 for the others."),
    _spec("spikewatch_signals_total", "run kind", "Detector signals raised for the run, by kind."),
    _spec(
        "spikewatch_verdicts_total",
        "run cause",
        "Forensics verdicts on the run's rollbacks, by cause (data, state, unknown).",
    ),
    _spec("spikewatch_sink_deliveries_total", "sink", "Messages the sink delivered."),
    _spec("spikewatch_sink_failures_total", "sink", "Sink deliveries that failed after retries."),
    _spec(
        "spikewatch_sink_dropped_total", "sink", "Messages the sink dropped unsent (queue full)."
    ),
    _spec("spikewatch_outbox_messages", "sink", "Messages in the sink's outbox not yet delivered."),
    _spec(
        "spikewatch_outbox_oldest_age_seconds",
        "sink",
        "Seconds the oldest undelivered outbox message has waited (0 when empty).",
    ),
    _spec("spikewatch_ingest_requests_total", "outcome", "Ingest HTTP requests, by outcome."),
    _spec("spikewatch_job_runs_total", "job_id", "Runs of the scheduled job."),
    _spec("spikewatch_job_failures_total", "job_id", "Runs of the scheduled job that raised."),
    _spec(
        "spikewatch_job_last_success_timestamp_seconds",
        "job_id",
        "Unix time (seconds) of the job's last success.",
    ),
    _spec("spikewatch_up", "", "1 while the spikewatch exporter answers."),
    _spec("spikewatch_collector_errors_total", "source", "Failed reads of a metrics source."),
)
"""Every metric family the collector exports, in exposition order."""
METRIC_NAMES: tuple[str, ...] = tuple(spec.name for spec in METRICS)
"""Exposed names (counters with ``_total``): what deploy rules and dashboards may use."""
