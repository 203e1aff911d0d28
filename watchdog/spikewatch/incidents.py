"""Incidents: the signals and decisions of one episode, folded into one record."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from spikewatch.records import ACTION_SEVERITY, Decision


@dataclass
class Incident:
    """What happened in one episode (a spike, a level shift, a NaN run, a divergence).

    ``action`` is the most severe decision taken for it, ``reason`` the reason of the
    first decision of that severity; ``status`` is ``"open"`` until the episode is
    confirmed or ends, then ``"closed"``, or ``"unresolved"`` when a replay's data ended
    before the episode could be confirmed (`unresolve`).
    """

    id: str
    run: str
    kind: str
    metric: str
    onset_step: int
    peak_step: int
    end_step: int | None
    transient: bool
    score: float
    action: str
    detected_step: int
    reason: str
    status: str = "open"
    #: The forensics verdict after its rollback (`Verdict.to_json`), when a probe ran.
    verdict: dict[str, Any] | None = None

    @classmethod
    def open(cls, decision: Decision) -> Incident:
        """Start an incident from the first decision of an episode."""
        s = decision.signal
        assert s is not None  # the monitor only folds decisions that carry a signal
        return cls(
            id=s.incident,
            run=s.run,
            kind=s.kind,
            metric=s.metric,
            onset_step=s.onset_step,
            peak_step=s.peak_step,
            end_step=s.end_step,
            transient=bool(s.transient),
            score=s.score,
            action=decision.action,
            detected_step=s.step,
            reason=decision.reason,
            status="closed" if s.stage == "confirmed" or s.kind == "divergence" else "open",
        )

    def fold(self, decision: Decision) -> None:
        """Update with a later decision of the same episode."""
        s = decision.signal
        assert s is not None
        if s.stage == "confirmed":
            self.kind, self.onset_step, self.peak_step = s.kind, s.onset_step, s.peak_step
            self.end_step, self.transient, self.status = s.end_step, bool(s.transient), "closed"
        else:
            self.peak_step = s.peak_step
        self.score = max(self.score, s.score)
        severity, current = ACTION_SEVERITY[decision.action], ACTION_SEVERITY[self.action]
        # A later decision of the same severity explains the episode better (a confirmed
        # "returned to trend" after "waiting for confirmation"), except a halt: the
        # halts after the first only say that the run was halted earlier.
        if severity > current or (severity == current and decision.action != "halt"):
            self.action, self.reason = decision.action, decision.reason

    def unresolve(self, *, peak_step: int, reason: str) -> None:
        """Mark the episode as never confirmed: the data ended first (end of a replay)."""
        self.status, self.peak_step, self.reason = "unresolved", peak_step, reason

    def to_json(self) -> dict[str, Any]:
        """Return a dict of JSON types."""
        return dataclasses.asdict(self)
