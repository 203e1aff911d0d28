"""`Service`: the registry, event store, operator, jobs, Slack sink and exporter together."""

from __future__ import annotations

import dataclasses
import os
import time
from collections import Counter
from collections.abc import Callable, Mapping
from typing import Any

from spikewatch import __version__
from spikewatch.errors import ConfigError
from spikewatch.service.config import ServiceConfig
from spikewatch.service.jobs import JobRunner
from spikewatch.service.metrics import ServiceCollector, SinkCounts, build_registry, render
from spikewatch.service.notify import Notifier
from spikewatch.service.operator import Operator
from spikewatch.service.registry import RunRegistry
from spikewatch.service.status import RunStatus
from spikewatch.service.store import EventStore
from spikewatch.sinks.slack import SlackSink
from spikewatch.sinks.slack_settings import SlackSettings


class Service:
    """Everything `spikewatch serve` runs, without the HTTP layer (see `create_app`).

    Example:
        >>> svc = Service(ServiceConfig(db=":memory:"), token="t")
        >>> svc.health()["status"], svc.health()["runs"]
        ('ok', 0)
        >>> svc.stop()
    """

    def __init__(
        self,
        config: ServiceConfig,
        *,
        token: str,
        slack: SlackSink | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not token:
            raise ConfigError(
                "the service token is empty: set SPIKEWATCH_TOKEN or pass --token-file"
            )
        self.config, self.token, self.slack, self.clock = config, token, slack, clock
        self.store = EventStore(config.db, clock=clock, incident_limit=config.keep_incidents)
        if slack is not None:
            slack.use_outbox(self.store.outbox)  # messages commit with the ingest
        notifier: Notifier | None = slack
        self.registry = RunRegistry(self.store, config, notifier=notifier, clock=clock)
        self.operator = Operator(self.registry)
        self.jobs = JobRunner(self.registry, clock=clock)
        self.ingest_counts: Counter[str] = Counter()
        self.collector = ServiceCollector(
            runs=self.registry.statuses,
            sinks=self._sink_counts,
            jobs=self.jobs.statuses,
            ingest=lambda: dict(self.ingest_counts),
        )
        self.metrics = build_registry(self.collector)
        self.started = clock()

    @classmethod
    def from_config(
        cls, config: ServiceConfig, *, token: str, environ: Mapping[str, str] = os.environ
    ) -> Service:
        """Build with the Slack sink the config and environment ask for (fails fast if bad)."""
        settings = SlackSettings.from_mapping(config.slack, environ=environ)
        service = cls(config, token=token, slack=None)
        # The sender resumes the outbox a previous process left (and its threads).
        service.slack = SlackSink.from_settings(settings, environ, outbox=service.store.outbox)
        service.registry.notifier = service.slack
        return service

    def start(self) -> None:
        """Start the scheduled jobs."""
        self.jobs.start()

    def stop(self) -> None:
        """Stop jobs, deliver the Slack messages due now (the rest wait in the outbox
        for the next start), close the store."""
        self.jobs.shutdown()
        if self.slack is not None:
            self.slack.close(timeout=5.0)
        self.store.close()

    def _sink_counts(self) -> dict[str, SinkCounts]:
        if self.slack is None:
            return {}
        messages = age = None
        try:
            backlog = self.store.outbox.backlog()
        except Exception:  # the store is down: /healthz says so; the counters still show
            backlog = None
        if backlog is not None:
            oldest = backlog.oldest_created
            messages = backlog.messages
            age = 0.0 if oldest is None else max(0.0, self.clock() - oldest)
        return {
            "slack": SinkCounts(
                delivered=self.slack.delivered,
                failures=self.slack.failures + self.registry.notify_failures,
                dropped=self.slack.dropped,
                outbox_messages=messages,
                outbox_oldest_age_s=age,
            )
        }

    def render_metrics(self) -> tuple[bytes, str]:
        """The Prometheus exposition and its content type."""
        return render(self.metrics)

    def run_settings(self, run: str) -> dict[str, Any]:
        """What a trainer starting ``run`` asks for: the service's monitor settings and
        approval mode, so policy is set in one place for every run."""
        cfg = self.config
        return {
            "run": run,
            "monitor": dataclasses.asdict(cfg.monitor),
            "approval": {
                "mode": cfg.approval,
                "timeout_s": cfg.approval_timeout_s,
                "default": cfg.approval_default,
            },
        }

    @staticmethod
    def run_view(status: RunStatus) -> dict[str, Any]:
        """A run's status as JSON."""
        return dataclasses.asdict(status)

    def health(self) -> dict[str, Any]:
        """Liveness: the store answers, and each job's last outcome."""
        try:
            store_ok = self.store.ping()
        except Exception:  # a broken store is what /healthz is for
            store_ok = False
        jobs = [dataclasses.asdict(j) for j in self.jobs.statuses()]
        failing = [j["job"] for j in jobs if j["last_error"] is not None]
        return {
            # 503 (from the route) only when the store is down: a failing job is worth a
            # look, not a restart of the service.
            "status": "down" if not store_ok else "degraded" if failing else "ok",
            "failing_jobs": failing,
            "version": __version__,
            "store": store_ok,
            "uptime_s": self.clock() - self.started,
            "runs": len(self.registry.runs),
            "jobs": jobs,
            "slack": None
            if self.slack is None
            else dataclasses.asdict(self._sink_counts()["slack"]),
        }
