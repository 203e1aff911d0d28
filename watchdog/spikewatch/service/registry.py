"""All runs of the service: ingest, commands back to trainers, views. Thread-safe.

The HTTP handlers and the scheduled jobs share one `RunRegistry`; a lock serialises
changes to a run (ingest is CPU work of a few milliseconds per request, so one lock
costs nothing on one core). Notifications are handed to the notifier after the store
commit, outside the lock.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from spikewatch.records import Decision
from spikewatch.service.announce import close_stall, touched_incidents, watch_recovery
from spikewatch.service.attempts import Continuation, body_digest, continuation, start_attempt
from spikewatch.service.commands import (
    apply_acks,
    apply_events,
    commands_from,
    trainer_halts,
    vetoed,
)
from spikewatch.service.config import ServiceConfig
from spikewatch.service.notify import Notice, Notifier
from spikewatch.service.payloads import IngestBatch, parse_ingest, parse_json
from spikewatch.service.run import MirrorMonitor, ServiceRun
from spikewatch.service.status import RunStatus
from spikewatch.service.store import EventStore
from spikewatch.service.store_schema import BatchWrite, StoredRun
from spikewatch.service.verdicts import apply_verdicts

log = logging.getLogger(__name__)


class RunRegistry:
    """Owns every `ServiceRun`; persists each change in the `EventStore` before answering.

    Example:
        >>> from spikewatch.records import StepRecord
        >>> reg = RunRegistry(EventStore(":memory:"), ServiceConfig())
        >>> batch = IngestBatch.of([StepRecord(run="r", step=0, loss=1.0)])
        >>> reg.ingest("r", batch, b'{"records": [{"step": 0, "loss": 1.0}]}')["accepted"]
        1
        >>> [s.run for s in reg.statuses()]
        ['r']
    """

    def __init__(
        self,
        store: EventStore,
        config: ServiceConfig,
        *,
        notifier: Notifier | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store, self.config, self.notifier, self.clock = store, config, notifier, clock
        self.lock = threading.RLock()
        self.runs: dict[str, ServiceRun] = {}
        self.stale: set[str] = set()  # runs whose last write failed: reload before ingesting
        self.notify_failures = 0
        for stored in store.runs():
            self.runs[stored.run] = self._restore(stored)

    def _restore(self, stored: StoredRun) -> ServiceRun:
        """Rebuild a run from its stored state, then replay the batches stored after it
        (the state is saved at most every ``state_every_s``; the batches at once)."""
        run = self._restore_saved(stored)
        for body in self.store.batches_after(stored.run, stored.state_batch):
            batch = parse_ingest(parse_json(body), stored.run, max_records=len(body))
            run.monitor.observe_columns(batch.steps, batch.loss, batch.grad_norm)
        return run

    def _restore_saved(self, stored: StoredRun) -> ServiceRun:
        run_id, keep = stored.run, self.config.recent_records
        return ServiceRun.restore(
            stored,
            self.config.monitor,
            incidents=self.store.incidents(run_id),
            commands=self.store.commands(run_id),
            recent=self.store.recent_records(run_id, limit=keep),
            keep=keep,
        )

    # -- ingest -------------------------------------------------------------------------
    def ingest(self, run_id: str, batch: IngestBatch, body: bytes) -> dict[str, Any]:
        """Observe a batch; persist it; return the response for the trainer."""
        notices: list[Notice] = []
        with self.lock:
            if not batch.steps and run_id not in self.runs and run_id not in self.stale:
                # Acks or a finish for a run never seen: nothing to keep, no run to create.
                empty = ServiceRun(run_id, self.config.monitor, recent=1)
                return self._response(empty, 0, duplicate=False)
            run = self._current(run_id)
            digest = body_digest(body)
            how = continuation(run, batch, digest)  # may refuse it: nothing changed yet
            if how == "retry":
                return self._response(run, 0, duplicate=True)
            try:
                self._ingest(run, batch, body, notices, how=how)
                run.digest = digest if batch.steps else run.digest
            except Exception:
                # The store did not take the batch: the in-memory run is ahead of it now.
                # Reload it before the client's retry, so that batch counts exactly once.
                self.stale.add(run_id)
                raise
            response = self._response(run, len(batch), duplicate=False)
        self._send(notices)
        return response

    def _current(self, run_id: str) -> ServiceRun:
        """The run to ingest into: reloaded from the store after a failed write."""
        if run_id in self.stale:
            stored = self.store.run(run_id)  # raises while the store is still down
            self.stale.discard(run_id)
            if stored is None:
                self.runs.pop(run_id, None)
            else:
                self.runs[run_id] = self._restore(stored)
        run = self.runs.get(run_id)
        if run is None:
            run = self.runs[run_id] = ServiceRun(
                run_id, self.config.monitor, recent=self.config.recent_records
            )
        return run

    def _ingest(
        self,
        run: ServiceRun,
        batch: IngestBatch,
        body: bytes,
        notices: list[Notice],
        *,
        how: Continuation,
    ) -> None:
        now = self.clock()
        write = BatchWrite(run=run.run, monitor=None, info={})
        report = batch.report
        if report is not None:
            run.use_trainer_decisions()
            run.config = report.config if report.config is not None else run.config
            run.restorable = report.restorable if report.restorable is not None else run.restorable
        write.commands += apply_acks(run, batch.acks, notices)
        steps = batch.steps
        rewound = self._continue(run, batch, how, write)
        run.client, run.seq = batch.client, batch.seq
        run.client_dropped = max(run.client_dropped, batch.dropped)
        if steps or batch.finished:
            run.finished = batch.finished  # records after a finish: the run goes on
        was_stalled = run.stalled
        decisions = self._decisions(run, batch, body, write, notices=notices, now=now)
        if steps or decisions:
            write.incidents = touched_incidents(
                run, decisions, notices, min_action=self.config.notify_min_action
            )
            watch_recovery(run, decisions, notices)
        if report is not None:  # after the announcements: a verdict follows its incident
            write.incidents += apply_verdicts(run, report.events, notices)
        if was_stalled and (steps or batch.finished):
            run.stalled = False
            if run.stall_incident:  # records again, or the trainer says it finished
                write.incidents.append(close_stall(run, notices))
        eventful = bool(write.commands or write.decisions) or rewound
        eventful = eventful or (report is not None and bool(report.events or report.config))
        saved = run.state_saved_at
        if eventful or saved is None or now - saved >= self.config.state_every_s:
            write.monitor = run.monitor_json()
            run.state_saved_at = now
        write.info = run.info()
        if self.notifier is not None:  # the messages commit with what caused them
            write.outbox = list(notices)
        self.store.write(write)

    def _decisions(
        self,
        run: ServiceRun,
        batch: IngestBatch,
        body: bytes,
        write: BatchWrite,
        *,
        notices: list[Notice],
        now: float,
    ) -> list[Decision]:
        """Observe the records; the decisions to keep: the trainer's, or the service's."""
        report = batch.report
        trainer = None if report is None else report.decisions
        decisions: list[Decision] = []
        if batch.steps:
            # Snapshots at the trainer's boundaries, as many as its ring can reach.
            keep = self.config.keep_snapshots
            keep = min(keep, len(run.restorable) + 1) if run.restorable else keep
            every = self.config.snapshot_every
            decisions = run.observe(
                batch, now=now, decisions=trainer, snapshot_every=every, keep=keep
            )
            write.snapshots, run.new_snapshots = run.new_snapshots, []
            write.body, write.count = body, len(batch.steps)
            write.first_step, write.last_step = batch.steps[0], batch.steps[-1]
        elif trainer and isinstance(run.monitor, MirrorMonitor):
            run.monitor.adopt(trainer)  # decisions whose records went in an earlier batch
            run.count_decisions(trainer)
            decisions = trainer
        if report is not None:
            write.commands += apply_events(run, report.events, notices)
            trainer_halts(run, decisions, notices)
        if decisions:
            write.decisions = [d.to_json() for d in decisions if d.action != "watch"]
            if report is None:
                approval = self.config.approval
                write.commands += commands_from(run, decisions, notices, approval=approval)
        return decisions

    def _continue(
        self, run: ServiceRun, batch: IngestBatch, how: Continuation, write: BatchWrite
    ) -> bool:
        """Rewind for a rollback, or begin a new attempt (`attempts`); True if either."""
        if how == "attempt":
            step = batch.steps[0]
            snapshot = self.store.snapshot_before(run.run, step)
            write.commands += start_attempt(run, step, snapshot)
            write.drop_snapshots_from = step  # the last attempt's, from where this one starts
            return True
        if how == "rewind" and batch.rewind_to is not None:
            self._rewind(run, batch.rewind_to, write)
            return True
        return False

    def _rewind(self, run: ServiceRun, step: int, write: BatchWrite) -> None:
        last = run.monitor.last_step
        if last is not None and step <= last:
            run.counts["skipped_batches"] += last + 1 - step + run.pending_skip_ahead
            run.pending_skip_ahead = 0
            if run.trainer_decides:  # the trainer rolled back on its own decision
                run.counts["rollbacks"] += 1
                if run.last_rollback is not None:
                    run.recovery = {
                        "incident": run.last_rollback["incident"],
                        "detected_step": run.last_rollback["step"],
                    }
        run.rewind(step, self.store.snapshot_before(run.run, step))
        run.monitor.last_step = step - 1
        run.last_snapshot_step = None
        write.drop_snapshots_from = step

    def _response(self, run: ServiceRun, accepted: int, *, duplicate: bool) -> dict[str, Any]:
        threshold = run.monitor.skip_threshold()
        return {
            "accepted": accepted,
            "duplicate": duplicate,
            "commands": run.live_commands("pending"),
            "skip_threshold": threshold if threshold != float("inf") else None,
            "halted": run.halted,
            "incidents": len(run.monitor.incidents),
            "vetoed": vetoed(run),
        }

    def notify(self, notice: Notice) -> None:
        """Hand one notice to the notifier's outbox (if any), counting a failure."""
        self._send([notice], stored=False)

    def _send(self, notices: list[Notice], *, stored: bool = True) -> None:
        """Wake the notifier for ``notices`` already in the outbox (stored with the
        ingest), or post them (jobs, right after their commit)."""
        if self.notifier is None or not notices:
            return
        try:
            if stored:
                self.notifier.wake()
            else:
                self.notifier.post(notices)
        except Exception:  # a sink bug must not fail an ingest that is already stored
            self.notify_failures += 1
            log.exception("spikewatch: notifier failed")

    # -- views --------------------------------------------------------------------------
    def statuses(self) -> list[RunStatus]:
        """Every run's status (copies)."""
        with self.lock:
            for run_id in list(self.stale):
                self._refresh(run_id)
            stall = self.config.stall_after_s
            return [r.status(now=self.clock(), stall_after_s=stall) for r in self.runs.values()]

    def status(self, run_id: str) -> RunStatus | None:
        """One run's status, or None for an unknown run."""
        with self.lock:
            self._refresh(run_id)
            run = self.runs.get(run_id)
            stall = self.config.stall_after_s
            return None if run is None else run.status(now=self.clock(), stall_after_s=stall)

    def _refresh(self, run_id: str) -> None:
        if run_id not in self.stale:
            return
        try:
            self._current(run_id)
        except Exception:  # the store is still down: show what memory has
            log.warning("spikewatch: cannot reload run %r from the event store yet", run_id)

    def commit_run(self, run: ServiceRun, *, commands: Sequence[dict[str, Any]] = ()) -> None:
        """Persist a run's state and some commands (operator actions, jobs)."""
        run.state_saved_at = self.clock()
        write = BatchWrite(
            run=run.run, monitor=run.monitor_json(), info=run.info(), commands=list(commands)
        )
        try:
            self.store.write(write)
        except Exception:
            self.stale.add(run.run)  # memory is ahead of the store: reload before reuse
            raise

    def fresh(self, run_id: str) -> ServiceRun | None:
        """The run to change outside ingest (operators), reloaded first if a write failed;
        None for an unknown run. Raises while the store is down. Hold `lock`."""
        if run_id not in self.runs and run_id not in self.stale:
            return None
        run = self._current(run_id)
        return run if run_id in self.runs else None

    def settled(self) -> list[ServiceRun]:
        """Runs whose memory matches the store (jobs skip the others until reloaded)."""
        return [r for r in self.runs.values() if r.run not in self.stale]
