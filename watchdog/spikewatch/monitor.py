"""The monitor: records in, decisions out. The same object runs embedded and in the service."""

from __future__ import annotations

import bisect
import dataclasses
import math
from collections.abc import Sequence
from typing import Any

from spikewatch.channel import MetricChannel
from spikewatch.fastpath import MAX_RUN
from spikewatch.forensics.verdict import Verdict
from spikewatch.incidents import Incident
from spikewatch.policy import Policy
from spikewatch.records import Decision, Signal, StepRecord
from spikewatch.settings import MonitorConfig

#: Shortest run of records worth scoring in bulk (below it, per-record is as fast).
_MIN_RUN = 16


class Monitor:
    """Watches one run: stage-1 detectors on every record, stage-2 confirmation, policy.

    Example:
        >>> import random
        >>> rng = random.Random(7)
        >>> mon = Monitor(run="demo")
        >>> actions = []
        >>> for step in range(400):
        ...     loss = 4.0 - 0.002 * step + rng.gauss(0, 0.03)
        ...     if step == 200:
        ...         loss += 2.0                      # one bad batch
        ...     if step >= 300:
        ...         loss += 1.5                      # the run jumps and stays up
        ...     for d in mon.observe(StepRecord(run="demo", step=step, loss=loss)):
        ...         actions.append((d.step, d.action, d.signal.kind))
        >>> actions  # doctest: +NORMALIZE_WHITESPACE
        [(200, 'watch', 'spike'), (208, 'watch', 'spike'),
         (300, 'watch', 'spike'), (315, 'rollback', 'level_shift')]
        >>> [(i.kind, i.onset_step, i.end_step, i.transient, i.action) for i in mon.incidents]
        [('spike', 200, 200, True, 'watch'), ('level_shift', 300, None, False, 'rollback')]
        >>> mon
        Monitor(run='demo', records=400, last_step=399, incidents=2, open=0)
    """

    def __init__(
        self,
        run: str = "run",
        config: MonitorConfig | None = None,
        *,
        policy: Policy | None = None,
    ) -> None:
        self.run = run
        self.config = config or MonitorConfig()
        self.policy = policy or Policy(self.config.policy)
        self.loss = MetricChannel(run, "loss", self.config)
        self.grad_norm = MetricChannel(run, "grad_norm", self.config)
        self._incidents: dict[str, Incident] = {}
        self.records = 0
        self.last_step: int | None = None
        self._budget = MAX_RUN  # records scored per bulk call; adapts (see `_routine`)
        self.last_verdict: Verdict | None = None

    def __repr__(self) -> str:
        still_open = sum(i.status == "open" for i in self._incidents.values())
        return (
            f"Monitor(run={self.run!r}, records={self.records}, last_step={self.last_step}, "
            f"incidents={len(self._incidents)}, open={still_open})"
        )

    @property
    def incidents(self) -> list[Incident]:
        """Every incident so far, in the order they opened."""
        return list(self._incidents.values())

    @property
    def undecided(self) -> bool:
        """True while a channel holds a candidate waiting for confirmation: an incident
        is open and its decision not taken yet (read-only).

        Example:
            >>> mon = Monitor(run="r")
            >>> for step in range(60):
            ...     _ = mon.observe(StepRecord(run="r", step=step, loss=1.0 + 0.01 * (step % 3)))
            >>> before = mon.undecided
            >>> _ = mon.observe(StepRecord(run="r", step=60, loss=50.0))
            >>> before, mon.undecided
            (False, True)
        """
        return self.loss.pending() is not None or self.grad_norm.pending() is not None

    def incident(self, incident_id: str) -> Incident | None:
        """The incident with this id, if any."""
        return self._incidents.get(incident_id)

    def restore_incidents(self, incidents: list[Incident]) -> None:
        """Put back incidents kept elsewhere (the service's event store) after a restart,
        so later signals of the same episode fold into them instead of reopening them."""
        for incident in incidents:
            self._incidents[incident.id] = incident

    def observe(self, record: StepRecord) -> list[Decision]:
        """Run one record through detectors and policy; return the decisions it caused.

        A grad norm of None, or of 0.0 next to a finite non-zero loss, was not measured
        (`measured_grad_norm`): the grad-norm detectors do not see it.
        """
        return self._observe_one(record.step, record.loss, record.grad_norm)

    def _observe_one(self, step: int, loss: float, grad_norm: float | None) -> list[Decision]:
        self.records += 1
        self.last_step = step
        signals = self.loss.update(step, loss)
        grad = measured_grad_norm(loss, grad_norm)
        if grad is not None:
            signals += self.grad_norm.update(step, grad)
        return self._decide(signals)

    def observe_many(self, records: Sequence[StepRecord]) -> list[Decision]:
        """Observe ``records`` in order: the same decisions and state as `observe` on each.

        Long healthy stretches are scored in bulk (see `spikewatch.fastpath`), about ten
        times faster; any record that could raise a signal goes through `observe`.

        Example:
            >>> import random
            >>> rng = random.Random(3)
            >>> recs = [StepRecord(run="r", step=t, loss=2.0 + rng.gauss(0, 0.01) + (t == 300))
            ...         for t in range(400)]
            >>> a, b = Monitor(run="r"), Monitor(run="r")
            >>> fast = a.observe_many(recs)
            >>> slow = [d for r in recs for d in b.observe(r)]
            >>> fast == slow, a.state_dict() == b.state_dict(), [d.step for d in fast]
            (True, True, [300, 308])
        """
        return self.observe_columns(
            [r.step for r in records], [r.loss for r in records], [r.grad_norm for r in records]
        )

    def observe_columns(
        self, steps: Sequence[int], losses: Sequence[float], grad_norms: Sequence[float | None]
    ) -> list[Decision]:
        """`observe_many` on columns (the service parses request bodies straight into them)."""
        out: list[Decision] = []
        i, n = 0, len(steps)
        while i < n:
            i += self._routine(steps, losses, grad_norms, i)
            if i < n:
                out.extend(self._observe_one(steps[i], losses[i], grad_norms[i]))
                i += 1
        return out

    def _routine(
        self,
        all_steps: Sequence[int],
        losses: Sequence[float],
        grad_norms: Sequence[float | None],
        start: int,
    ) -> int:
        """Advance in bulk past the routine records from ``start``; return how many."""
        stop = min(len(all_steps), start + self._budget)
        size = stop - start
        if size < _MIN_RUN:
            return 0
        steps = list(all_steps[start:stop])
        loss_values = list(losses[start:stop])
        loss_plan = self.loss.plan_routine(steps, loss_values)
        if loss_plan is None:
            return 0
        count = loss_plan[1]
        at, grads = _measured(loss_values, grad_norms[start:stop])
        if grads:
            grad_plan = self.grad_norm.plan_routine([steps[k] for k in at], grads)
            if grad_plan is None:
                return 0
            if grad_plan[1] < len(grads):  # stop at the record of the first unusable one
                count = min(count, at[grad_plan[1]])
            self.grad_norm.advance_routine(grad_plan[0], bisect.bisect_left(at, count))
        self.loss.advance_routine(loss_plan[0], count)
        if count:
            self.records += count
            self.last_step = steps[count - 1]
        # Grow the scored run while whole runs pass; shrink it after a flag, so the work
        # scored past a flag and thrown away stays small on spiky curves.
        full = count == size
        self._budget = min(MAX_RUN, self._budget * 2) if full else _MIN_RUN * 4
        return count

    def flush(self) -> list[Incident]:
        """End of input (a replay): leave pending candidates unresolved; decide nothing.

        A candidate waits ``confirm_after`` records for change-point analysis to say
        whether it came back. When the data ends first there is nothing to confirm it
        with (a live run would still be waiting), so its incident keeps its onset, is
        marked ``"unresolved"`` and no decision is taken. Returns those incidents.
        """
        out = []
        for channel in (self.loss, self.grad_norm):
            pending = channel.pending()
            incident = None if pending is None else self._incidents.get(pending.incident)
            if pending is not None and incident is not None and incident.status == "open":
                incident.unresolve(
                    peak_step=pending.peak_step,
                    reason="the data ends before the candidate could be confirmed "
                    f"({pending.after} of the {self.config.confirm_after} quiet records "
                    "it needs): nothing decided",
                )
                out.append(incident)
        return out

    def adopt_verdict(self, decision: Decision, verdict: Verdict) -> tuple[Decision, Verdict]:
        """Keep a forensics `Verdict` with its incident; return the rollback as it now
        stands (``forensics.on_state``: a ``state`` verdict escalates it at once) and
        the verdict with its ``action``.

        ``data`` keeps the rollback and its skips as they are (the hook quarantines the
        samples); ``unknown`` changes nothing. The verdict's ``action`` says which.
        """
        on_state = self.config.forensics.on_state
        if verdict.cause == "state" and on_state == "lr_cut" and decision.escalation > 0:
            # The trouble returned and the policy cut the LR for it already.
            decided = dataclasses.replace(
                decision, reason=f"{decision.reason}; forensics: state-caused (LR already cut)"
            )
            action = f"lr x{decision.lr_factor:g} (cut already: the trouble returned)"
        elif verdict.cause == "state" and on_state == "lr_cut":
            decided = self.policy.escalate("forensics: state-caused", decision)
            action = "halt" if decided.action == "halt" else f"lr x{decided.lr_factor:g} now"
        elif verdict.cause == "state" and on_state == "halt":
            decided = dataclasses.replace(
                decision,
                action="halt",
                reason=f"{decision.reason}; forensics: state-caused ({verdict.why}): halted "
                "for a person to lower the learning rate or change precision",
            )
            self.policy.halt()
            action = "halt"
        else:
            action = {"data": "skip the batches, quarantine the samples"}.get(
                verdict.cause, "rollback as decided"
            )
            decided = dataclasses.replace(
                decision, reason=f"{decision.reason}; forensics: {verdict.cause}"
            )
        verdict = dataclasses.replace(verdict, action=action)
        signal = decision.signal
        incident = None if signal is None else self._incidents.get(signal.incident)
        if incident is not None:
            incident.verdict = verdict.to_json()
            incident.fold(decided)  # the reason (and a halt) now say what forensics found
        self.last_verdict = verdict
        return decided, verdict

    def _decide(self, signals: list[Signal]) -> list[Decision]:
        decisions = [self.policy.decide(s) for s in signals]
        for d in decisions:
            assert d.signal is not None
            incident = self._incidents.get(d.signal.incident)
            if incident is None:
                self._incidents[d.signal.incident] = Incident.open(d)
            else:
                incident.fold(d)
        return decisions

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable state of detectors and policy (incidents are history, kept)."""
        return {
            "loss": self.loss.state_dict(),
            "grad_norm": self.grad_norm.state_dict(),
            "policy": self.policy.state_dict(),
            "records": self.records,
            "last_step": self.last_step,
        }

    def skip_threshold(self) -> float:
        """The grad norm above which the policy would skip an update (inf until known).

        Lets a trainer hook decide a skip on the step itself while it hands records to
        the monitor in batches.
        """
        baseline = self.grad_norm.spike.baseline
        if not self.grad_norm.spike.ready or not baseline > 0.0:
            return float("inf")
        return self.policy.config.extreme_grad_ratio * baseline

    def detector_state(self) -> dict[str, Any]:
        """The detectors' state alone: what a rollback rewinds (see `rewind`)."""
        return {"loss": self.loss.state_dict(), "grad_norm": self.grad_norm.state_dict()}

    def rewind(self, detector_state: dict[str, Any]) -> None:
        """Put the detectors back to an earlier `detector_state`, keeping the policy.

        A rollback rewinds the detectors with the weights, but the policy must remember
        the rollback itself, or budgets and escalation would reset every time.
        """
        self.loss.load_state_dict(detector_state["loss"])
        self.grad_norm.load_state_dict(detector_state["grad_norm"])

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore detectors and policy (a restart from a checkpoint)."""
        self.loss.load_state_dict(state["loss"])
        self.grad_norm.load_state_dict(state["grad_norm"])
        self.policy.load_state_dict(state["policy"])
        self.records = int(state["records"])
        self.last_step = state["last_step"]


def measured_grad_norm(loss: float, grad_norm: float | None) -> float | None:
    """The grad norm as a value, or None when it was not measured.

    A grad norm of exactly 0.0 next to a finite, non-zero loss is a logging artefact
    (DeepSpeed and the HF Trainer write 0.0 on steps where they did not compute it): a
    model with a non-zero loss has a non-zero gradient. Only NaN/inf is non-finite.

    Example:
        >>> measured_grad_norm(2.5, 0.0), measured_grad_norm(2.5, 0.7), measured_grad_norm(0.0, 0.0)
        (None, 0.7, 0.0)
    """
    if grad_norm == 0.0 and loss != 0.0 and math.isfinite(loss):
        return None
    return grad_norm


def _measured(
    losses: Sequence[float], grad_norms: Sequence[float | None]
) -> tuple[Sequence[int], list[float]]:
    """Positions and values of the measured grad norms among aligned records."""
    if None not in grad_norms and 0.0 not in grad_norms:  # the common case, in C
        return range(len(grad_norms)), list(grad_norms)  # type: ignore[arg-type]
    at, values = [], []
    for k, (loss, grad) in enumerate(zip(losses, grad_norms, strict=True)):
        g = measured_grad_norm(loss, grad)
        if g is not None:
            at.append(k)
            values.append(g)
    return at, values
