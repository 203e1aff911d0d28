"""The machinery every trainer hook shares: values, decisions, snapshots, rollbacks.

Framework adapters (`SpikeGuard`, the HF and Lightning callbacks) only translate their
framework's events into calls on a `GuardEngine`.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from spikewatch.records import ACTION_SEVERITY, Decision, StepRecord
from spikewatch.service_transport import Approval, ServiceTransport
from spikewatch.settings import MonitorConfig
from spikewatch.transport import Transport
from spikewatch_hooks.core.approval import Approvals
from spikewatch_hooks.core.commands import CommandDesk
from spikewatch_hooks.core.restore import roll_back
from spikewatch_hooks.core.updates import Updates, as_list
from spikewatch_hooks.core.values import Number, ValuePipe
from spikewatch_hooks.distributed.local_values import plain_value
from spikewatch_hooks.distributed.lockstep import Lockstep
from spikewatch_hooks.forensics.probe import Forensics
from spikewatch_hooks.state import payload
from spikewatch_hooks.state.ledger import SkipLedger
from spikewatch_hooks.state.snapshots.ring import Snapshot, SnapshotRing

log = logging.getLogger("spikewatch_hooks")


class GuardEngine:
    """Turns (loss, grad norm) per step into skips, rollbacks and halts.

    ``optimizer`` and ``scheduler`` may be one object or a sequence (`Updates`); the
    engine's ``optimizer``/``scheduler`` are the first ones, ``optimizers``/``schedulers``
    all of them. ``scaler``: a GradScaler stepped with them and kept in every snapshot.
    ``disk``: the guard's disk checkpoints, the deep path of a rollback (`core.restore`).
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | Sequence[torch.optim.Optimizer],
        scheduler: Any,
        *,
        scaler: Any = None,
        transport: Transport,
        config: MonitorConfig,
        snapshot_every: int,
        keep_snapshots: int,
        run_id: str = "run",
        monitor_every: int = 8,
        lockstep: Lockstep | None = None,
        adopt_lockstep: bool = False,
        ring_options: dict[str, Any] | None = None,
    ) -> None:
        self.model = model
        self.updates = Updates(as_list(optimizer), as_list(scheduler), scaler)
        self.optimizers, self.schedulers = self.updates.optimizers, self.updates.schedulers
        self.optimizer = self.optimizers[0]
        self.scheduler: Any = self.schedulers[0] if self.schedulers else None
        self.disk: Any = None  # state.deep.DiskCheckpoints, set by SpikeGuard
        self.forensics: Forensics | None = None  # the probe after a rollback, set by hooks
        self.transport, self.config, self.run_id = transport, config, run_id
        self.snapshot_every = snapshot_every
        self.monitor_every = monitor_every
        self.lockstep = lockstep
        # Under torch.distributed every rank decides alike; only rank 0 speaks.
        self.reporting = lockstep is None or lockstep.rank == 0
        self.last_incident_ranks = ""
        self._skip_threshold = math.inf
        self._ring_options = dict(ring_options or {})
        self.ring = self._new_ring(keep_snapshots)
        self.ledger = SkipLedger()
        self.values = ValuePipe()
        self.stats: Counter[str] = Counter()
        self.step_count = 0
        self.position = 0
        # Data positions count loader batches, steps count optimizer steps: with gradient
        # accumulation the adapter sets this, and ``skip_ahead`` (in steps) becomes batches.
        self.batches_per_step = 1
        self.halted = False
        self.halt_reason = ""
        self.lr_scale = 1.0
        # A guard built before init_process_group joins the lockstep at its first step.
        self._adopt_lockstep = adopt_lockstep and lockstep is None
        self.approvals = Approvals(self.ring, getattr(transport, "approval", Approval()))
        self.desk = CommandDesk(transport, self.approvals)
        self._snapshot()

    # -- per step -----------------------------------------------------------------------
    def step(
        self, loss: Number, grad_norm: Number | None, data_position: int | None
    ) -> Decision | None:
        """A whole step of a hand-written loop: observe, then step, skip, roll back or halt."""
        decision = self.observe(loss, grad_norm, data_position)
        outcome = self.apply(decision)
        if outcome in ("rollback", "halt"):
            return decision
        if outcome == "skip":
            self.count("skipped_steps")
        self.updates.step(skip=outcome == "skip")
        self.clear_found_inf()
        self.finish_step()
        return decision

    def observe(
        self, loss: Number, grad_norm: Number | None, data_position: int | None
    ) -> Decision | None:
        """Queue this step's values, feed what is ready to the monitor, return a decision."""
        if self.halted:
            return None
        loss, grad_norm = plain_value(loss), plain_value(grad_norm)  # FSDP2: DTensor norms
        if self._adopt_lockstep:
            self._join_lockstep()
        if data_position is not None:
            self.position = data_position
        if self.updates.scaler_backoff(loss):
            self.count("scaler_backoffs")
            grad_norm = None  # the scaler's own back-off: not a non-finite grad for the monitor
        lr = self.updates.lr()
        if self.lockstep is not None:
            self.lockstep.stage(self.step_count, self.position, lr, loss, grad_norm)
        self.updates.device_skip(loss, grad_norm, global_only=self.lockstep is not None)
        self.values.push(self.step_count, self.position, lr, loss, grad_norm)
        # Records go to the monitor in batches (one hand-off per monitor_every steps costs
        # far less than one per step); a suspicious step is handed over at once, so its
        # skip is decided before the optimizer steps.
        if len(self.values) < self.monitor_every and not self._suspicious():
            return None
        if self.lockstep is not None:
            flag = self.desk.waiting() if self.lockstep.rank == 0 else 0
            ready = self.lockstep.gather(float(flag))  # every rank gathers at the same step
            self.values.clear()
        else:
            ready = self.values.ready()
        records = [
            StepRecord(
                run=self.run_id,
                step=v.step,
                loss=v.loss,
                grad_norm=v.grad_norm,
                lr=v.lr,
                data_position=v.position,
            )
            for v in ready
        ]
        decisions = self.transport.submit(records) if records else []
        self._skip_threshold = self.transport.skip_threshold()
        decisions += self.desk.take(self.lockstep, reporting=self.reporting)
        return max(decisions, key=lambda d: ACTION_SEVERITY[d.action], default=None)

    def _join_lockstep(self) -> None:
        """First step of a guard built before ``init_process_group``: join the lockstep
        now, with rank 0's settings, or every rank would decide alone and deadlock DDP."""
        self._adopt_lockstep = False
        if not Lockstep.active():
            return
        self.lockstep = Lockstep()
        self.reporting = self.lockstep.rank == 0
        adopt = getattr(self.transport, "adopt_rank", None)
        if adopt is not None:
            adopt(self.lockstep)
            self.approvals.approval = getattr(self.transport, "approval", Approval())
        log.info("spikewatch: joined torch.distributed lockstep at the first step")

    def _suspicious(self) -> bool:
        latest = self.values.latest()
        if latest is None:  # not on the host yet (GPU): the device-side skip covers it
            return False
        loss, grad = latest
        if grad is None:  # under torch.distributed: no global value, hand over every step
            return self.lockstep is not None or not math.isfinite(loss)
        if self.lockstep is not None:  # only the grad norm is the same on every rank
            return not math.isfinite(grad) or grad > self._skip_threshold
        return not (math.isfinite(loss) and math.isfinite(grad)) or grad > self._skip_threshold

    def apply(self, decision: Decision | None) -> str:
        """Act on a decision at this step boundary: ``rollback``, ``halt``, ``skip`` or ``none``."""
        if self.halted:
            return "halt"
        if decision is None:
            return "none"
        if decision.action == "halt":
            self.halt(decision.reason)
            return "halt"
        if decision.action == "rollback":
            operator = self.desk.from_operator(decision)
            if not operator and self.approvals.manual:
                self.desk.report([self.approvals.propose(decision)], reporting=self.reporting)
                if self.reporting:
                    log.warning("spikewatch: rollback proposed, waiting for approval: %s",
                                decision.reason)  # fmt: skip
                return "none"
            target = decision.rollback_before_step or 0
            if operator and self.ring.newest_at_or_before(target) is None:
                self.count("refused_rollbacks")
                self.desk.refuse(decision, self.ring, step=self.step_count,
                                 reporting=self.reporting)  # fmt: skip
                return "none"
            self.rollback(decision)
            return "rollback"
        if decision.action == "skip_step" and decision.step == self.step_count:
            return "skip"
        return "none"

    def finish_step(self) -> None:
        """Count the step; take a snapshot when one is due."""
        self.step_count += 1
        if self.step_count % self.snapshot_every == 0:
            self._snapshot(next_position=self.position + 1)

    # -- actions ------------------------------------------------------------------------
    def rollback(self, decision: Decision) -> None:
        """Restore the newest snapshot at or before the target (the newest disk
        checkpoint at or before it when the ring does not reach back); skip the batches
        consumed since (`core.restore.roll_back`)."""
        roll_back(self, decision)

    def halt(self, reason: str) -> None:
        """Stop the run, saying why and what to try."""
        self.updates.settle_scaler()
        self.halted, self.halt_reason = True, reason
        self.stats["halted"] = 1
        if not self.reporting:
            return
        log.error("spikewatch halted run %r at step %d: %s", self.run_id, self.step_count, reason)

    def drain(self) -> None:
        """Hand the monitor the steps still waiting in the value pipe (training ended).

        Under torch.distributed with a monitor service this gathers, so every rank calls
        it (the callbacks and `SpikeGuard.close` do, at the end of training); embedded,
        nobody would see the last few records, so no rank waits for the others here.
        """
        if self.halted or not (len(self.values) or (self.lockstep and len(self.lockstep))):
            return
        if self.lockstep is not None and not isinstance(self.transport, ServiceTransport):
            return  # embedded lockstep: a collective here would only risk a hang
        ready = self.lockstep.gather() if self.lockstep is not None else self.values.ready()
        self.values.clear()
        records = [
            StepRecord(run=self.run_id, step=v.step, loss=v.loss, grad_norm=v.grad_norm,
                       lr=v.lr, data_position=v.position)
            for v in ready
        ]  # fmt: skip
        if records:
            self.transport.submit(records)  # decisions after the last step change nothing

    def finish(self, timeout: float = 10.0) -> None:
        """Training ended: deliver the records still queued for a monitor service and tell
        it the run finished, so it is not taken for a stall (no-op when embedded)."""
        self.drain()
        finish = getattr(self.transport, "finish", None)
        if finish is not None and not finish(timeout):
            log.warning("spikewatch: records still queued for the monitor after %g s", timeout)

    # -- state --------------------------------------------------------------------------
    def summary(self) -> dict[str, Any]:
        """Counters for ``guard.stats``."""
        return {
            "rollbacks": self.stats["rollbacks"],
            "skipped_steps": self.stats["skipped_steps"],
            "skipped_batches": self.stats["skipped_batches"],
            "incidents": self.transport.incidents(),
            "halted": self.halted,
            "halt_reason": self.halt_reason,
            "snapshots": self.ring.steps,
            "snapshot_bytes": self.ring.nbytes,
            "skip_ledger": self.ledger.ranges(),
            "last_incident_ranks": self.last_incident_ranks,
            "lr_scale": self.lr_scale,
            "last_verdict": None,
            **({} if self.forensics is None else self.forensics.summary()),
            **{
                k: v
                for k, v in self.stats.items()
                if k not in ("rollbacks", "skipped_steps", "skipped_batches", "halted")
            },
        }

    def guard_state(self) -> dict[str, Any]:
        """The guard's own state (step, data position, ledger, detectors, counters)."""
        return {
            "step": self.step_count,
            "next_position": self.position + 1,
            "ledger": self.ledger.state_dict(),
            "detector_state": self.transport.detector_state(),
            "lr_scale": self.lr_scale,
            "stats": dict(self.stats),
        }

    def load_guard_state(self, guard: dict[str, Any]) -> None:
        """Restore `guard_state` (the live training objects are restored by the caller);
        the snapshot ring restarts from the restored state."""
        self.step_count = int(guard["step"])
        self.position = int(guard["next_position"]) - 1
        self.ledger.load_state_dict(guard["ledger"])
        self.transport.rewind(guard["detector_state"])
        self.lr_scale = float(guard["lr_scale"])
        self.stats = Counter(guard["stats"])
        self.ring.clear()
        self._snapshot(next_position=self.position + 1)

    def checkpoint_payload(self) -> dict[str, Any]:
        """Everything a restart needs, for `save_checkpoint` (`state.payload`)."""
        return {**payload.training_payload(self), "guard": self.guard_state()}

    def load_checkpoint_payload(self, saved: dict[str, Any]) -> None:
        """Load what `checkpoint_payload` saved into the live objects."""
        payload.load_training_payload(self, saved)
        self.load_guard_state(saved["guard"])

    def count(self, name: str, n: int = 1) -> None:
        """Add to a counter of ``stats`` (skipped_steps, skipped_batches, late_skips, ...)."""
        self.stats[name] += n

    # -- helpers ------------------------------------------------------------------------
    def _snapshot(self, next_position: int = 0) -> Snapshot:
        restorable = getattr(self.transport, "restorable", None)
        snap = self.ring.take(
            self.step_count,
            next_position,
            {
                "detector_state": self.transport.detector_state(),
                "lr_scale": self.lr_scale,
            },
        )
        if restorable is not None:
            restorable(self.ring.steps)
        return snap

    def _new_ring(self, keep: int) -> SnapshotRing:
        return SnapshotRing(
            self.model, self.optimizers, self.schedulers, keep=keep, extras=self.updates.extras,
            group=None if self.lockstep is None else self.lockstep.group,
            **self._ring_options,
        )  # fmt: skip

    def attribution(self, decision: Decision) -> str:
        """Under torch.distributed: which rank(s) saw the trouble at its onset."""
        if self.lockstep is None or decision.signal is None:
            return ""
        where = self.lockstep.attribution(decision.signal.onset_step)
        self.last_incident_ranks = where
        return f" [{where}]"

    def clear_found_inf(self) -> None:
        """Drop the on-device skip flags once the optimizers stepped (or were skipped)."""
        self.updates.clear_found_inf()
