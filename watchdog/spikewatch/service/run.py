"""One run inside the service: its `Monitor` and what the service tracks around it."""

from __future__ import annotations

import json
from collections import Counter, deque
from typing import Any

from spikewatch.incidents import Incident
from spikewatch.monitor import Monitor
from spikewatch.records import Decision, Signal
from spikewatch.service.payloads import IngestBatch
from spikewatch.service.snapshot_points import snapshot_points
from spikewatch.service.status import RunState, RunStatus
from spikewatch.service.store_schema import StoredRun
from spikewatch.settings import MonitorConfig

#: Command statuses: ``proposed`` waits for an operator; ``pending`` is sent to the
#: trainer with every ingest response until it acknowledges it (``applied``).
LIVE_STATUSES = ("proposed", "pending")


class MirrorMonitor(Monitor):
    """A run whose trainer decides: detectors for the scores, incidents from its decisions.

    The service's own policy stays out of it (the trainer's monitor is authoritative);
    `adopt` folds the trainer's decisions into incidents exactly as `Monitor` does.
    """

    def _decide(self, signals: list[Signal]) -> list[Decision]:
        return []

    def adopt(self, decisions: list[Decision]) -> None:
        """Open or fold the incidents of the trainer's ``decisions``."""
        known = {i.id: i for i in self.incidents}
        for d in decisions:
            if d.signal is None:
                continue
            incident = known.get(d.signal.incident)
            if incident is None:
                known[d.signal.incident] = incident = Incident.open(d)
                self.restore_incidents([incident])
            else:
                incident.fold(d)


class ServiceRun:
    """A run's monitor, latest values, counters, commands and recent curve.

    Example:
        >>> run = ServiceRun("r", MonitorConfig(), recent=100)
        >>> batch = IngestBatch(steps=[0], loss=[2.5], grad_norm=[1.0], lr=[None])
        >>> run.observe(batch, now=10.0)
        []
        >>> s = run.status(now=11.0, stall_after_s=60.0)
        >>> s.state, s.records, s.loss, s.last_record_time
        ('active', 1, 2.5, 10.0)
    """

    def __init__(self, run: str, config: MonitorConfig, *, recent: int) -> None:
        self.run = run
        self.monitor = Monitor(run=run, config=config)
        self.halted = False
        self.stalled = False
        self.finished = False
        self.last_record_time: float | None = None
        self.loss: float | None = None
        self.grad_norm: float | None = None
        self.lr: float | None = None
        self.signals: Counter[str] = Counter()
        self.counts: Counter[str] = Counter()  # rollbacks, skipped_steps, skipped_batches
        self.verdicts: Counter[str] = Counter()  # the trainer's forensics verdicts, by cause
        self.client_dropped = 0
        self.client: str | None = None
        self.seq: int | None = None
        self.commands: dict[str, dict[str, Any]] = {}
        self.recent: deque[tuple[int, float]] = deque(maxlen=recent)
        self.last_snapshot_step: int | None = None
        self.state_saved_at: float | None = None  # when the monitor state was last stored
        self.recovery: dict[str, Any] | None = None  # a rollback being watched for recovery
        self.swept_step: int | None = None
        self.stall_incident: str | None = None  # the open stall incident, if any
        self.announced: set[str] = set()  # incidents already sent to the notifier
        self.pending_skip_ahead = 0  # batches an applied rollback skips ahead (counted at rewind)
        self.trainer_decides = False  # its trainer's monitor decides; the service watches
        self.config: dict[str, Any] | None = None  # the trainer's effective settings
        self.restorable: list[int] | None = None  # steps the trainer can restore now
        self.last_rollback: dict[str, Any] | None = None  # the trainer's newest rollback
        self.attempt = 1  # a new client session starting the run over is a new attempt
        self.attempt_step: int | None = None  # the first step of the current attempt
        self.digest: str | None = None  # of the last body with records (retries w/o seq)
        self.new_snapshots: list[tuple[int, str]] = []  # taken by `observe`, not stored yet

    # -- ingest -------------------------------------------------------------------------
    def use_trainer_decisions(self) -> None:
        """From now on the trainer decides: keep the detectors, drop the service's policy."""
        if self.trainer_decides:
            return
        mirror = MirrorMonitor(run=self.run, config=self.monitor.config)
        mirror.load_state_dict(self.monitor.state_dict())
        mirror.restore_incidents(self.monitor.incidents)
        self.monitor, self.trainer_decides = mirror, True

    def observe(
        self,
        batch: IngestBatch,
        *,
        now: float,
        decisions: list[Decision] | None = None,
        snapshot_every: int = 0,
        keep: int = 1,
    ) -> list[Decision]:
        """Feed a batch to the monitor; track the latest values and signal counts.

        ``decisions``: the trainer's own (service mode), folded into incidents instead
        of the service's. With ``snapshot_every``, the detectors are snapshotted at the
        boundaries the batch crosses (`snapshot_points`) into `new_snapshots`.
        """
        own = self._observe_cut(batch, snapshot_every, keep)
        if decisions is None:
            decisions = own
        elif isinstance(self.monitor, MirrorMonitor):
            self.monitor.adopt(decisions)
        self._track(batch, now)
        self.count_decisions(decisions)
        return decisions

    def _observe_cut(self, batch: IngestBatch, every: int, keep: int) -> list[Decision]:
        """Observe the batch in pieces, snapshotting the detectors between them."""
        points = [] if every <= 0 else snapshot_points(
            self.monitor.last_step, batch.steps, every=every, keep=keep
        )  # fmt: skip
        decisions: list[Decision] = []
        start = 0
        for end, label in [*points, (len(batch.steps), None)]:
            if end > start:
                decisions += self.monitor.observe_columns(
                    batch.steps[start:end], batch.loss[start:end], batch.grad_norm[start:end]
                )
                start = end
            if label is not None and label != self.last_snapshot_step:
                self.new_snapshots.append((label, self.monitor_json()))
                self.last_snapshot_step = label
        return decisions

    def count_decisions(self, decisions: list[Decision]) -> None:
        """Signals and skipped updates, whoever decided."""
        # Loss and grad norm may both flag one step (a NaN loss makes the grad norm NaN
        # too): it is still one skipped update, and one signal of that kind.
        self.counts["skipped_steps"] += len({d.step for d in decisions if d.action == "skip_step"})
        flagged = {(d.step, d.signal.kind) for d in decisions if d.signal is not None}
        self.signals.update(kind for _, kind in flagged)
        for d in decisions:
            if d.action == "rollback" and self.trainer_decides:
                incident = d.signal.incident if d.signal else ""
                self.last_rollback = {"incident": incident, "step": d.step}
                self.pending_skip_ahead = d.skip_ahead

    def _track(self, batch: IngestBatch, now: float) -> None:
        """Keep the latest values and the recent curve."""
        self.last_record_time, self.loss = now, batch.loss[-1]
        if self.attempt_step is None:
            self.attempt_step = batch.steps[0]
        self.grad_norm = _last_given(batch.grad_norm, self.grad_norm)
        self.lr = _last_given(batch.lr, self.lr)
        self.recent.extend(zip(batch.steps, batch.loss, strict=True))
        self.stalled = False

    def rewind(self, step: int, snapshot: dict[str, Any] | None) -> None:
        """The trainer rolled back and continues at ``step``: rewind detection with it.

        ``snapshot`` is the newest stored monitor state from before ``step``; without
        one the detectors keep their state (only the window's tail is then stale).
        """
        if snapshot is not None:
            self.monitor.rewind({"loss": snapshot["loss"], "grad_norm": snapshot["grad_norm"]})
        while self.recent and self.recent[-1][0] >= step:
            self.recent.pop()

    # -- views --------------------------------------------------------------------------
    @property
    def state(self) -> RunState:
        """``halted`` beats ``finished`` beats ``stalled`` beats ``active``."""
        if self.halted:
            return "halted"
        if self.finished:
            return "finished"
        return "stalled" if self.stalled else "active"

    def status(self, *, now: float, stall_after_s: float) -> RunStatus:
        """A copy of what the service knows, for /v1/runs and Prometheus."""
        incidents = self.monitor.incidents
        return RunStatus(
            run=self.run,
            state=self.state,
            records=self.monitor.records,
            last_step=self.monitor.last_step,
            last_record_time=self.last_record_time,
            loss=self.loss,
            grad_norm=self.grad_norm,
            lr=self.lr,
            spike_score=self.monitor.loss.spike.score,
            signals=dict(self.signals),
            verdicts=dict(self.verdicts),
            rollbacks=self.counts["rollbacks"],
            skipped_steps=self.counts["skipped_steps"],
            skipped_batches=self.counts["skipped_batches"],
            incidents_open=sum(i.status == "open" for i in incidents),
            incidents_total=len(incidents),
            client_dropped=self.client_dropped,
            decides="trainer" if self.trainer_decides else "service",
            attempt=self.attempt,
            attempt_step=self.attempt_step,
            config=self.config,
            restorable=self.restorable,
        )

    def live_commands(self, status: str = "pending") -> list[dict[str, Any]]:
        """Commands in ``status``, oldest first."""
        return [c for c in self.commands.values() if c["status"] == status]

    # -- persistence --------------------------------------------------------------------
    def monitor_json(self) -> str:
        """The monitor's state as JSON (NaN kept as a literal, like the wire format)."""
        return json.dumps(self.monitor.state_dict())

    def info(self) -> dict[str, Any]:
        """The service's own bookkeeping, persisted with every write."""
        return {
            "halted": self.halted,
            "stalled": self.stalled,
            "finished": self.finished,
            "last_record_time": self.last_record_time,
            "latest": [self.loss, self.grad_norm, self.lr],
            "signals": dict(self.signals),
            "counts": dict(self.counts),
            "verdicts": dict(self.verdicts),
            "client_dropped": self.client_dropped,
            "client": self.client,
            "seq": self.seq,
            "last_snapshot_step": self.last_snapshot_step,
            "recovery": self.recovery,
            "swept_step": self.swept_step,
            "announced": sorted(self.announced),
            "stall_incident": self.stall_incident,
            "pending_skip_ahead": self.pending_skip_ahead,
            "trainer_decides": self.trainer_decides,
            "config": self.config,
            "restorable": self.restorable,
            "last_rollback": self.last_rollback,
            "attempt": self.attempt,
            "attempt_step": self.attempt_step,
            "digest": self.digest,
        }

    @classmethod
    def restore(
        cls,
        stored: StoredRun,
        config: MonitorConfig,
        *,
        incidents: list[dict[str, Any]],
        commands: list[dict[str, Any]],
        recent: list[dict[str, Any]],
        keep: int,
    ) -> ServiceRun:
        """Rebuild a run after a restart from what the store holds."""
        run = cls(stored.run, config, recent=keep)
        run.monitor.load_state_dict(stored.monitor)
        run.monitor.restore_incidents([Incident(**i) for i in incidents])
        info = stored.info
        run.halted, run.stalled = bool(info["halted"]), bool(info["stalled"])
        run.finished = bool(info["finished"])
        run.last_record_time = info["last_record_time"]
        run.loss, run.grad_norm, run.lr = info["latest"]
        run.signals, run.counts = Counter(info["signals"]), Counter(info["counts"])
        run.verdicts = Counter(info.get("verdicts", {}))  # none in an older store
        run.client_dropped, run.client, run.seq = (
            info["client_dropped"],
            info["client"],
            info["seq"],
        )
        run.last_snapshot_step, run.recovery = info["last_snapshot_step"], info["recovery"]
        run.swept_step = info["swept_step"]
        run.announced = set(info["announced"])
        run.stall_incident = info["stall_incident"]
        run.pending_skip_ahead = int(info["pending_skip_ahead"])
        if info.get("trainer_decides"):
            run.use_trainer_decisions()
        run.config, run.restorable = info.get("config"), info.get("restorable")
        run.last_rollback = info.get("last_rollback")
        run.attempt, run.attempt_step = int(info.get("attempt", 1)), info.get("attempt_step")
        run.digest = info.get("digest")
        run.commands = {c["id"]: c for c in commands}
        for r in recent:  # in arrival order; a step going back drops the abandoned branch
            step = int(r["step"])
            while run.recent and run.recent[-1][0] >= step:
                run.recent.pop()
            run.recent.append((step, float(r["loss"])))
        return run


def _last_given(values: list[float | None], default: float | None) -> float | None:
    for v in reversed(values):
        if v is not None:
            return v
    return default
