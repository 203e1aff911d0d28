"""Scheduled jobs (APScheduler 3.x): stall checks, change-point sweeps, digests, retention.

Each job is a plain function of the registry, so tests call them directly; `JobRunner`
schedules them on a background thread and records how each run went for /healthz and
Prometheus. A failing job is logged and counted; it never stops the scheduler.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

from apscheduler.schedulers.background import BackgroundScheduler

from spikewatch.incidents import Incident
from spikewatch.service.notify import digest_notice, incident_notice
from spikewatch.service.registry import RunRegistry
from spikewatch.service.status import JobStatus
from spikewatch.service.sweep import LevelShift, find_level_shift

log = logging.getLogger(__name__)


def check_stalls(registry: RunRegistry) -> int:
    """Mark runs with no records for ``stall_after_s`` as stalled; return how many."""
    cfg, now, stalled = registry.config, registry.clock(), []
    with registry.lock:
        for run in registry.settled():
            last = run.last_record_time
            if run.state != "active" or last is None or now - last <= cfg.stall_after_s:
                continue
            run.stalled = True
            step = run.monitor.last_step or 0
            incident = Incident(
                id=f"stall-{int(last)}", run=run.run, kind="stall", metric="loss", onset_step=step,
                peak_step=step, end_step=None, transient=False, score=0.0, action="watch",
                detected_step=step, reason=(
                    f"no records for {now - last:.0f} s (stall_after_s="
                    f"{cfg.stall_after_s:g}): check "
                    "the trainer process, its node and its connection to the service"
                ),
            )  # fmt: skip
            run.stall_incident = incident.id
            run.monitor.restore_incidents([incident])
            registry.store.save_incident(incident.to_json())
            registry.commit_run(run)
            stalled.append((replace(incident), list(run.recent)[-300:]))
    for incident, window in stalled:
        registry.notify(incident_notice(incident, window))
    return len(stalled)


def sweep(registry: RunRegistry) -> int:
    """Look for level shifts in every active run's recent curve; return how many were new."""
    cfg, found = registry.config, []
    with registry.lock:
        todo = [
            (run, list(run.recent)[-cfg.sweep_records :])
            for run in registry.settled()
            if run.state == "active" and run.monitor.last_step != run.swept_step
        ]
    for run, points in todo:  # ruptures runs outside the lock: ingest goes on meanwhile
        shift = _find_shift(run.run, points, registry)
        with registry.lock:
            if registry.runs.get(run.run) is not run or run.run in registry.stale:
                continue  # reloaded meanwhile: this object is no longer the run
            run.swept_step = points[-1][0] if points else None
            covered = shift is None or any(
                abs(i.onset_step - shift.onset_step) <= cfg.monitor.window
                for i in run.monitor.incidents
                if i.kind != "stall"
            )
            if not covered and shift is not None:
                incident = _sweep_incident(run.run, shift, points[-1][0])
                run.monitor.restore_incidents([incident])
                run.signals["level_shift"] += 1
                registry.store.save_incident(incident.to_json())
                found.append((replace(incident), points))
            registry.commit_run(run)
    for incident, window in found:
        registry.notify(incident_notice(incident, window))
    return len(found)


def _find_shift(
    run: str, points: list[tuple[int, float]], registry: RunRegistry
) -> LevelShift | None:
    """One run's sweep; a curve ruptures cannot handle costs that run's sweep, not all."""
    cfg = registry.config.monitor
    try:
        return find_level_shift(
            [s for s, _ in points],
            [v for _, v in points],
            penalty=cfg.cpd_penalty,
            elevated=cfg.elevated,
            min_rise=cfg.min_rise,
        )
    except (ArithmeticError, ValueError) as exc:
        log.warning("spikewatch: change-point sweep of run %r failed: %s", run, exc)
        return None


def _sweep_incident(run: str, shift: LevelShift, step: int) -> Incident:
    return Incident(
        id=f"loss-sweep-{shift.onset_step}", run=run, kind="level_shift", metric="loss",
        onset_step=shift.onset_step, peak_step=step, end_step=None, transient=False,
        score=shift.score, action="watch", detected_step=step, reason=(
            f"change-point sweep: the loss level rose from {shift.before:.4g} to "
            f"{shift.after:.4g} at step {shift.onset_step} and stayed there"
        ),
    )  # fmt: skip


def digest(registry: RunRegistry) -> int:
    """Send every run's summary to the notifier; return how many runs it covered."""
    runs = registry.statuses()
    if runs:
        registry.notify(digest_notice(runs, registry.config.digest_interval_s))
    return len(runs)


def retention(registry: RunRegistry) -> int:
    """Prune what the retention settings no longer keep; return record batches dropped.

    Runs without the registry's lock: the store deletes in small transactions, so
    ingest and /healthz go on in between, then gives the freed space back.
    """
    pruned = registry.store.retain(registry.config.retention())
    log.info("spikewatch: retention dropped %s", pruned)
    return pruned.batches


@dataclass(slots=True)
class _Track:
    last_run_time: float | None = None
    last_success_time: float | None = None
    runs: int = 0
    failures: int = 0
    last_error: str | None = None


class JobRunner:
    """Runs the jobs on an APScheduler `BackgroundScheduler` and tracks their health."""

    def __init__(self, registry: RunRegistry, *, clock: Callable[[], float] = time.time) -> None:
        cfg = registry.config
        self.registry, self.clock = registry, clock
        jobs: dict[str, tuple[float, Callable[[RunRegistry], int]]] = {
            "stall_check": (cfg.stall_check_interval_s, check_stalls),
            "changepoint_sweep": (cfg.sweep_interval_s, sweep),
            "retention": (cfg.retention_interval_s, retention),
        }
        if cfg.digest_interval_s > 0:
            jobs["digest"] = (cfg.digest_interval_s, digest)
        self.jobs = jobs
        self._tracks = {name: _Track() for name in jobs}
        self._lock = threading.Lock()
        self.scheduler = BackgroundScheduler(
            timezone="UTC",
            job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": 30},
        )

    def start(self) -> None:
        """Schedule every job at its interval (first run one interval from now)."""
        for name, (interval, _) in self.jobs.items():
            self.scheduler.add_job(self.run, "interval", args=[name], seconds=interval, id=name)
        self.scheduler.start()

    def shutdown(self) -> None:
        """Stop the scheduler (waits for a running job)."""
        if self.scheduler.running:
            self.scheduler.shutdown(wait=True)

    def run(self, name: str) -> int | None:
        """Run one job now and record the outcome; return its result (None on failure)."""
        track = self._tracks[name]
        with self._lock:
            track.last_run_time, track.runs = self.clock(), track.runs + 1
        try:
            result = self.jobs[name][1](self.registry)
        except Exception as exc:  # counted and shown in /healthz; the scheduler goes on
            log.exception("spikewatch: job %s failed", name)
            with self._lock:
                track.failures, track.last_error = (
                    track.failures + 1,
                    f"{type(exc).__name__}: {exc}",
                )
            return None
        with self._lock:
            track.last_success_time, track.last_error = self.clock(), None
        return result

    def statuses(self) -> list[JobStatus]:
        """Every job's health and next run time."""
        out = []
        for name, track in self._tracks.items():
            job = self.scheduler.get_job(name) if self.scheduler.running else None
            nxt = job.next_run_time.timestamp() if job is not None and job.next_run_time else None
            with self._lock:
                out.append(JobStatus(
                    job=name, next_run_time=nxt, last_run_time=track.last_run_time,
                    last_success_time=track.last_success_time, runs=track.runs,
                    failures=track.failures, last_error=track.last_error,
                ))  # fmt: skip
        return out
