"""Data shapes of a replay: the curve read from a file and the report of what was found."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from spikewatch.incidents import Incident
from spikewatch.records import Decision


@dataclass
class Curve:
    """A logged training curve, one entry per logged step (steps strictly increasing).

    ``grad_norm`` / ``lr`` are None when the file has no such column; inside a present
    column an entry is None where nothing was logged at that step (a blank cell, a
    missing key, a JSON null): a grad norm logged every 10th step is not a NaN on the
    other nine. Only a logged ``nan``/``inf`` is a non-finite value.
    """

    path: str
    format: str
    steps: list[int]
    loss: list[float]
    grad_norm: list[float | None] | None = None
    lr: list[float | None] | None = None
    dropped: dict[str, int] = field(default_factory=dict)
    """Rows (lines, entries) of the file that did not become points, counted by reason,
    e.g. ``{"no loss": 12}`` for evaluation rows; shown by `spikewatch replay`."""

    def __len__(self) -> int:
        return len(self.steps)


@dataclass
class ReplayEvent:
    """One incident found in a curve (the `--json` event shape, plus a few extra keys).

    ``kind`` is ``"unresolved"`` (and ``transient`` None) for a candidate the curve ended
    on before it could be confirmed; ``incident`` is the id the decisions refer to.
    """

    kind: str
    metric: str
    onset_step: int
    peak_step: int
    end_step: int | None
    transient: bool | None
    score: float
    action: str
    detected_step: int
    reason: str = ""
    incident: str = ""

    def to_json(self) -> dict[str, Any]:
        """Return a dict of JSON types."""
        return dataclasses.asdict(self)

    @classmethod
    def from_incident(cls, incident: Incident) -> ReplayEvent:
        """The event view of a monitor incident (scores rounded for reading)."""
        unresolved = incident.status == "unresolved"
        return cls(
            kind="unresolved" if unresolved else incident.kind,
            metric=incident.metric,
            onset_step=incident.onset_step,
            peak_step=incident.peak_step,
            end_step=incident.end_step,
            transient=None if unresolved else incident.transient,
            score=round(incident.score, 3),
            action=incident.action,
            detected_step=incident.detected_step,
            reason=incident.reason,
            incident=incident.id,
        )


@dataclass(frozen=True)
class ReplayDecision:
    """One decision of the policy during a replay, in the order it was taken.

    An incident keeps only its most severe action; these keep every step of the ladder
    (each rollback with its restore step and LR factor, then the halt).

    Attributes:
        step: the step the decision was taken at.
        action: ``watch``, ``skip_step``, ``rollback`` or ``halt``.
        reason: why, in words.
        incident: id of the incident (event) it belongs to.
        metric: the metric of the signal behind it.
        kind: the kind of that signal (spike, level_shift, nonfinite, divergence).
        rollback_before_step: for a rollback, restore the newest snapshot at or before it.
        lr_factor: learning-rate factor after a rollback (below 1 when escalated).
        skip_ahead: batches to skip after a rollback.
        escalation: escalation level of the policy at the decision.
    """

    step: int
    action: str
    reason: str
    incident: str
    metric: str
    kind: str
    rollback_before_step: int | None = None
    lr_factor: float = 1.0
    skip_ahead: int = 0
    escalation: int = 0

    @classmethod
    def from_decision(cls, decision: Decision) -> ReplayDecision:
        """The timeline entry of a monitor decision."""
        signal = decision.signal
        assert signal is not None  # the monitor's decisions all answer a signal
        return cls(
            step=decision.step,
            action=decision.action,
            reason=decision.reason,
            incident=signal.incident,
            metric=signal.metric,
            kind=signal.kind,
            rollback_before_step=decision.rollback_before_step,
            lr_factor=decision.lr_factor,
            skip_ahead=decision.skip_ahead,
            escalation=decision.escalation,
        )

    def to_json(self) -> dict[str, Any]:
        """Return a dict of JSON types."""
        return dataclasses.asdict(self)


@dataclass
class ReplayReport:
    """Everything a replay found; ``to_json`` is the `spikewatch replay --json` output."""

    points: int
    events: list[ReplayEvent] = field(default_factory=list)
    decisions: list[ReplayDecision] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        """Return ``{"points": int, "events": [...], "decisions": [...]}``."""
        return {
            "points": self.points,
            "events": [e.to_json() for e in self.events],
            "decisions": [d.to_json() for d in self.decisions],
        }
