"""The policy: turns signals into decisions along an escalation ladder, with budgets.

Pure: no clock, no I/O. Steps are the only notion of time, so a replay and a live run
decide the same way, and the state rewinds with a checkpoint.

Ladder: ``watch`` (benign outliers: count, don't act) -> ``skip_step`` (non-finite or
extreme grad norm, decided before the optimizer step) -> ``rollback`` (a spike that does
not heal, a divergence, or non-finite values that keep coming) -> ``rollback`` again,
further back with a lower LR, when the same trouble returns -> ``halt`` when the budget
is spent.
"""

from __future__ import annotations

import dataclasses
import math
from collections import deque
from dataclasses import dataclass
from typing import Any

from spikewatch.errors import bad_value
from spikewatch.records import Action, Decision, Signal
from spikewatch.validation import check_float, check_int


@dataclass(frozen=True)
class PolicyConfig:
    """Settings of the `Policy` (all in optimizer steps).

    Attributes:
        margin: roll back to a snapshot at least this many steps before the onset.
        skip_ahead: after a rollback, also skip this many batches not read yet.
        extreme_grad_ratio: a grad norm this many times its baseline skips the update.
        nonfinite_rollback_after: this many non-finite steps in a row trigger a rollback.
        recurrence_steps: a new rollback whose onset lies within this many steps of the
            previous rollback's onset is the same trouble returning: escalate.
        max_escalation: escalation levels allowed before halting.
        lr_cut: learning-rate factor applied per escalation level.
        max_rollbacks: rollbacks allowed within ``budget_steps``; one more halts.
        budget_steps: the sliding window of the rollback budget.
    """

    margin: int = 100
    skip_ahead: int = 100
    extreme_grad_ratio: float = 10.0
    nonfinite_rollback_after: int = 3
    recurrence_steps: int = 500
    max_escalation: int = 2
    lr_cut: float = 0.5
    max_rollbacks: int = 5
    budget_steps: int = 10_000

    def __post_init__(self) -> None:
        check_int("margin", self.margin, minimum=0)
        check_int("skip_ahead", self.skip_ahead, minimum=0)
        check_float("extreme_grad_ratio", self.extreme_grad_ratio, minimum=1.0)
        check_int("nonfinite_rollback_after", self.nonfinite_rollback_after, minimum=1)
        check_int("recurrence_steps", self.recurrence_steps, minimum=0)
        check_int("max_escalation", self.max_escalation, minimum=0)
        if not 0.0 < self.lr_cut <= 1.0:
            raise bad_value("lr_cut", self.lr_cut, "use a factor in (0, 1]")
        check_int("max_rollbacks", self.max_rollbacks, minimum=0)
        check_int("budget_steps", self.budget_steps, minimum=1)


class Policy:
    """Decides what to do about each `Signal`.

    Example:
        >>> from spikewatch.records import Signal
        >>> policy = Policy()
        >>> def sig(kind, step, transient=None, stage="confirmed", onset=None):
        ...     return Signal(run="r", kind=kind, metric="loss", step=step, value=9.0,
        ...                   score=12.0, baseline=3.0, peak_step=step, transient=transient,
        ...                   onset_step=step - 5 if onset is None else onset, stage=stage)
        >>> policy.decide(sig("spike", 900, transient=True)).action
        'watch'
        >>> d = policy.decide(sig("level_shift", 1000, transient=False))
        >>> d.action, d.rollback_before_step, d.lr_factor
        ('rollback', 895, 1.0)
        >>> d = policy.decide(sig("level_shift", 1200, transient=False))
        >>> d.action, d.rollback_before_step, d.lr_factor, d.escalation
        ('rollback', 995, 0.5, 1)
        >>> policy.decide(sig("nonfinite", 1300, stage="streaming", onset=1300)).action
        'skip_step'
    """

    def __init__(self, config: PolicyConfig | None = None) -> None:
        self.config = config or PolicyConfig()
        self._rollback_steps: deque[int] = deque()
        self._last_onset: int | None = None
        self._escalation = 0
        self._halted = False

    @property
    def halted(self) -> bool:
        """True once the policy has decided to halt (every later decision is halt)."""
        return self._halted

    @property
    def rollbacks(self) -> int:
        """Rollbacks decided within the current budget window."""
        return len(self._rollback_steps)

    def decide(self, signal: Signal) -> Decision:
        """Map one signal to a `Decision`."""
        if self._halted:
            return self._decision(signal, "halt", "the run was halted earlier; resume it by hand")
        if signal.kind == "nonfinite":
            return self._nonfinite(signal)
        if signal.metric == "grad_norm":
            return self._grad_norm(signal)
        if signal.kind == "divergence":
            return self._rollback(signal, "the loss has been drifting upward (divergence)")
        if signal.stage == "confirmed" and signal.transient is False:
            return self._rollback(signal, "the loss jumped and did not come back")
        if signal.stage == "confirmed":
            return self._decision(signal, "watch", "a transient outlier that returned to trend")
        return self._decision(signal, "watch", "a loss spike; waiting for confirmation")

    def _nonfinite(self, signal: Signal) -> Decision:
        if signal.stage == "confirmed":
            return self._decision(signal, "watch", f"{signal.metric} is finite again")
        run_length = signal.step - signal.onset_step + 1
        if run_length >= self.config.nonfinite_rollback_after:
            return self._rollback(signal, f"{run_length} non-finite steps in a row")
        return self._decision(signal, "skip_step", f"non-finite {signal.metric}: skip the update")

    def _grad_norm(self, signal: Signal) -> Decision:
        ratio = signal.value / signal.baseline if signal.baseline > 0 else math.inf
        if signal.stage == "streaming" and ratio >= self.config.extreme_grad_ratio:
            return self._decision(
                signal, "skip_step", f"grad norm {ratio:.1f}x its baseline: skip the update"
            )
        return self._decision(signal, "watch", "grad-norm excursion below the skip ratio")

    def _rollback(self, signal: Signal, why: str) -> Decision:
        cfg = self.config
        while self._rollback_steps and self._rollback_steps[0] <= signal.step - cfg.budget_steps:
            self._rollback_steps.popleft()
        recurring = (
            self._last_onset is not None
            and signal.onset_step - self._last_onset <= cfg.recurrence_steps
        )
        self._escalation = self._escalation + 1 if recurring else 0
        if len(self._rollback_steps) >= cfg.max_rollbacks or self._escalation > cfg.max_escalation:
            self._halted = True
            return self._decision(signal, "halt", self._halt_reason(why))
        self._rollback_steps.append(signal.step)
        self._last_onset = signal.onset_step
        margin = cfg.margin * 2**self._escalation
        detail = f"{why}; onset at step {signal.onset_step}, restore <= step "
        target = max(signal.onset_step - margin, 0)
        return self._decision(
            signal,
            "rollback",
            detail + str(target),
            rollback_before_step=target,
            lr_factor=cfg.lr_cut**self._escalation,
            skip_ahead=cfg.skip_ahead * 2**self._escalation,
        )

    def escalate(self, why: str, decision: Decision) -> Decision:
        """Escalate the rollback just decided at once (forensics said: the state, not the
        data): the next LR cut now, or a halt when the escalation budget is spent.

        Example:
            >>> from spikewatch.records import Signal
            >>> p = Policy()
            >>> s = Signal(run="r", kind="level_shift", metric="loss", step=300, value=9.0,
            ...            score=12.0, baseline=3.0, onset_step=290, peak_step=300,
            ...            transient=False, stage="confirmed")
            >>> d = p.escalate("state-caused", p.decide(s))
            >>> d.action, d.lr_factor, d.escalation
            ('rollback', 0.5, 1)
        """
        cfg = self.config
        if self._escalation >= cfg.max_escalation:
            self._halted = True
            return dataclasses.replace(decision, action="halt", reason=self._halt_reason(why))
        self._escalation += 1
        return dataclasses.replace(
            decision,
            lr_factor=cfg.lr_cut**self._escalation,
            escalation=self._escalation,
            reason=f"{decision.reason}; {why}: lr x{cfg.lr_cut**self._escalation:g} now",
        )

    def _halt_reason(self, why: str) -> str:
        cfg = self.config
        return (
            f"{why}, and the rollback budget is spent ({len(self._rollback_steps)} rollbacks "
            f"in {cfg.budget_steps} steps, escalation {self._escalation}/{cfg.max_escalation}): "
            "inspect the data around the onset, lower the learning rate or restart from an "
            "older checkpoint, then resume"
        )

    def _decision(self, signal: Signal, action: Action, reason: str, **extra: Any) -> Decision:
        return Decision(
            run=signal.run,
            step=signal.step,
            action=action,
            reason=reason,
            signal=signal,
            escalation=self._escalation,
            **extra,
        )

    def halt(self) -> None:
        """Halt from now on (forensics with ``on_state="halt"``)."""
        self._halted = True

    def resume(self) -> None:
        """Clear a halt (an operator's decision)."""
        self._halted = False
        self._escalation = 0

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable state."""
        return {
            "rollback_steps": list(self._rollback_steps),
            "last_onset": self._last_onset,
            "escalation": self._escalation,
            "halted": self._halted,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict` returned."""
        self._rollback_steps = deque(int(s) for s in state["rollback_steps"])
        last = state["last_onset"]
        self._last_onset = None if last is None else int(last)
        self._escalation = int(state["escalation"])
        self._halted = bool(state["halted"])
