"""Data shapes of a replay: the curve read from a file and the report of what was found."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from spikewatch.incidents import Incident


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
    """One incident found in a curve (the `--json` event shape, plus a few extra keys)."""

    kind: str
    metric: str
    onset_step: int
    peak_step: int
    end_step: int | None
    transient: bool
    score: float
    action: str
    detected_step: int
    reason: str = ""

    def to_json(self) -> dict[str, Any]:
        """Return a dict of JSON types."""
        return dataclasses.asdict(self)

    @classmethod
    def from_incident(cls, incident: Incident) -> ReplayEvent:
        """The event view of a monitor incident (scores rounded for reading)."""
        fields = {f.name: getattr(incident, f.name) for f in dataclasses.fields(cls)}
        return cls(**{**fields, "score": round(incident.score, 3)})


@dataclass
class ReplayReport:
    """Everything a replay found; ``to_json`` is the `spikewatch replay --json` output."""

    points: int
    events: list[ReplayEvent] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        """Return ``{"points": int, "events": [...]}``."""
        return {"points": self.points, "events": [e.to_json() for e in self.events]}
