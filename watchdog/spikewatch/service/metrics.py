"""Prometheus exporter of the monitor service: one collector over injected read-only views.

The collector keeps no service state: every scrape calls the callables it was given
(runs, sinks, jobs, ingest counts) and turns their answers into metric families. A
callable that raises costs only its own metrics; the rest are still exported and
``spikewatch_collector_errors_total{source=...}`` counts the failure.

Example:
    >>> status = RunStatus(run="r1", state="halted", records=12, last_step=11,
    ...                    last_record_time=1700000000.0, loss=float("nan"),
    ...                    grad_norm=None, lr=0.001, spike_score=4.5, signals={"spike": 2})
    >>> collector = ServiceCollector(runs=lambda: [status], sinks=lambda: {},
    ...                              jobs=lambda: [], ingest=lambda: {"accepted": 3})
    >>> body, content_type = render(build_registry(collector))
    >>> content_type
    'text/plain; version=1.0.0; charset=utf-8'
    >>> wanted = ("spikewatch_loss", "spikewatch_grad_norm", "spikewatch_run_state",
    ...           "spikewatch_signals_total", "spikewatch_ingest_requests_total{")
    >>> for line in body.decode().splitlines():
    ...     if line.startswith(wanted):
    ...         print(line)
    spikewatch_loss{run="r1"} NaN
    spikewatch_run_state{run="r1",state="active"} 0.0
    spikewatch_run_state{run="r1",state="stalled"} 0.0
    spikewatch_run_state{run="r1",state="halted"} 1.0
    spikewatch_run_state{run="r1",state="finished"} 0.0
    spikewatch_signals_total{kind="nonfinite",run="r1"} 0.0
    spikewatch_signals_total{kind="spike",run="r1"} 2.0
    spikewatch_signals_total{kind="level_shift",run="r1"} 0.0
    spikewatch_signals_total{kind="divergence",run="r1"} 0.0
    spikewatch_ingest_requests_total{outcome="accepted"} 3.0
    spikewatch_ingest_requests_total{outcome="rejected"} 0.0
    spikewatch_ingest_requests_total{outcome="unauthorized"} 0.0

    ``spikewatch_grad_norm`` has no sample: the run never reported one.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping

from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import CollectorRegistry

from spikewatch.service.metric_specs import (
    COLLECTOR_SOURCES,
    INGEST_OUTCOMES,
    METRIC_NAMES,
    METRICS,
    RUN_STATES,
    SIGNAL_KINDS,
    VERDICT_CAUSES,
    MetricSpec,
    SinkCounts,
)
from spikewatch.service.status import JobStatus, RunStatus

__all__ = [
    "COLLECTOR_SOURCES", "INGEST_OUTCOMES", "METRICS", "METRIC_NAMES", "RUN_STATES",
    "SIGNAL_KINDS", "VERDICT_CAUSES", "MetricSpec", "ServiceCollector", "SinkCounts",
    "build_registry", "render",
]  # fmt: skip

log = logging.getLogger(__name__)

# Exposed name -> attribute of RunStatus / SinkCounts / JobStatus (a None value is omitted).
_RUN_FIELDS: dict[str, str] = {
    "spikewatch_loss": "loss",
    "spikewatch_grad_norm": "grad_norm",
    "spikewatch_learning_rate": "lr",
    "spikewatch_spike_score": "spike_score",
    "spikewatch_last_record_timestamp_seconds": "last_record_time",
    "spikewatch_last_step": "last_step",
    "spikewatch_incidents_open": "incidents_open",
    "spikewatch_records_total": "records",
    "spikewatch_rollbacks_total": "rollbacks",
    "spikewatch_skipped_steps_total": "skipped_steps",
    "spikewatch_skipped_batches_total": "skipped_batches",
    "spikewatch_incidents_total": "incidents_total",
    "spikewatch_client_dropped_records_total": "client_dropped",
}
_SINK_FIELDS: dict[str, str] = {
    "spikewatch_sink_deliveries_total": "delivered",
    "spikewatch_sink_failures_total": "failures",
    "spikewatch_sink_dropped_total": "dropped",
    "spikewatch_outbox_messages": "outbox_messages",
    "spikewatch_outbox_oldest_age_seconds": "outbox_oldest_age_s",
}
_JOB_FIELDS: dict[str, str] = {
    "spikewatch_job_runs_total": "runs",
    "spikewatch_job_failures_total": "failures",
    "spikewatch_job_last_success_timestamp_seconds": "last_success_time",
}

_Sample = tuple[str, tuple[str, ...], float]


def _with_known(known: tuple[str, ...], counts: Mapping[str, int]) -> Iterator[tuple[str, int]]:
    # Known label values always appear (0 when absent) so rate() works from the first scrape.
    for key in (*known, *sorted(set(counts) - set(known))):
        yield key, counts.get(key, 0)


def _field_samples(fields: Mapping[str, str], label: str, source: object) -> list[_Sample]:
    values = ((name, getattr(source, attr)) for name, attr in fields.items())
    return [(name, (label,), float(value)) for name, value in values if value is not None]


def _run_samples(statuses: Iterable[RunStatus]) -> list[_Sample]:
    # Keyed by run id: a duplicate series would make Prometheus reject the whole scrape.
    by_run = {status.run: status for status in statuses}
    samples: list[_Sample] = []
    for run, status in by_run.items():
        samples += _field_samples(_RUN_FIELDS, run, status)
        for state in RUN_STATES:
            samples.append(("spikewatch_run_state", (run, state), float(status.state == state)))
        for kind, count in _with_known(SIGNAL_KINDS, status.signals):
            samples.append(("spikewatch_signals_total", (run, kind), float(count)))
        for cause, count in _with_known(VERDICT_CAUSES, status.verdicts):
            samples.append(("spikewatch_verdicts_total", (run, cause), float(count)))
    return samples


def _sink_samples(sinks: Mapping[str, SinkCounts]) -> list[_Sample]:
    samples: list[_Sample] = []
    for sink, counts in sorted(sinks.items()):
        samples += _field_samples(_SINK_FIELDS, sink, counts)
    return samples


def _job_samples(jobs: Iterable[JobStatus]) -> list[_Sample]:
    samples: list[_Sample] = []
    for job in sorted(jobs, key=lambda j: j.job):
        samples += _field_samples(_JOB_FIELDS, job.job, job)
    return samples


def _ingest_samples(ingest: Mapping[str, int]) -> list[_Sample]:
    known = _with_known(INGEST_OUTCOMES, ingest)
    return [("spikewatch_ingest_requests_total", (key,), float(n)) for key, n in known]


class ServiceCollector:
    """Custom collector: reads the service through callables on every scrape.

    Args:
        runs: returns the current `RunStatus` of every run.
        sinks: returns `SinkCounts` by sink name.
        jobs: returns the `JobStatus` of every scheduled job.
        ingest: returns ingest request counts by outcome
            (``accepted``, ``rejected``, ``unauthorized``).

    Example:
        >>> def broken() -> list[RunStatus]:
        ...     raise OSError("store is gone")
        >>> collector = ServiceCollector(runs=broken, sinks=dict, jobs=list, ingest=dict)
        >>> [m.name for m in collector.collect() if m.samples][-2:]
        ['spikewatch_up', 'spikewatch_collector_errors']
        >>> collector.errors["runs"]
        1
    """

    def __init__(
        self,
        *,
        runs: Callable[[], Iterable[RunStatus]],
        sinks: Callable[[], Mapping[str, SinkCounts]],
        jobs: Callable[[], Iterable[JobStatus]],
        ingest: Callable[[], Mapping[str, int]],
    ) -> None:
        self.runs = runs
        self.sinks = sinks
        self.jobs = jobs
        self.ingest = ingest
        self._errors = dict.fromkeys(COLLECTOR_SOURCES, 0)
        # Scrapes may run concurrently (threaded HTTP servers); guard the error counts.
        self._lock = threading.Lock()

    @property
    def errors(self) -> dict[str, int]:
        """Failed calls so far, by source (a copy)."""
        with self._lock:
            return dict(self._errors)

    def describe(self) -> list[Metric]:
        """Empty families, so a registry refuses a second collector with the same names."""
        return [spec.family() for spec in METRICS]

    def collect(self) -> Iterator[Metric]:
        """Build every metric family from one call of each source."""
        families = {spec.name: spec.family() for spec in METRICS}
        sources: tuple[tuple[str, Callable[[], list[_Sample]]], ...] = (
            ("runs", lambda: _run_samples(self.runs())),
            ("sinks", lambda: _sink_samples(self.sinks())),
            ("jobs", lambda: _job_samples(self.jobs())),
            ("ingest", lambda: _ingest_samples(self.ingest())),
        )
        for source, samples_of in sources:
            for name, labels, value in self._guarded(source, samples_of):
                families[name].add_metric(labels, value)
        families["spikewatch_up"].add_metric((), 1.0)
        for source, count in self.errors.items():
            families["spikewatch_collector_errors_total"].add_metric((source,), float(count))
        yield from families.values()

    def _guarded(self, source: str, samples_of: Callable[[], list[_Sample]]) -> list[_Sample]:
        # A scrape must never fail because one view of the service did.
        try:
            return samples_of()
        except Exception as exc:
            with self._lock:
                first = self._errors[source] == 0
                self._errors[source] += 1
            # The traceback once; afterwards the counter tells how often it keeps failing.
            log.warning(
                "metrics source %r failed, exporting the rest: %r", source, exc, exc_info=first
            )
            return []


def build_registry(collector: ServiceCollector) -> CollectorRegistry:
    """A fresh registry (never the process-global one) holding only ``collector``.

    Example:
        >>> c = ServiceCollector(runs=list, sinks=dict, jobs=list, ingest=dict)
        >>> build_registry(c).get_sample_value("spikewatch_up")
        1.0
    """
    registry = CollectorRegistry()
    registry.register(collector)
    return registry


def render(registry: CollectorRegistry) -> tuple[bytes, str]:
    """The body and content type of a ``/metrics`` answer (Prometheus text format).

    Example:
        >>> c = ServiceCollector(runs=list, sinks=dict, jobs=list, ingest=dict)
        >>> body, _ = render(build_registry(c))
        >>> b"spikewatch_up 1.0" in body
        True
    """
    return generate_latest(registry), CONTENT_TYPE_LATEST
