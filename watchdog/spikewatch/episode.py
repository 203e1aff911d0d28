"""A channel's open episode: the flagged excursion that waits for confirmation."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Episode:
    """A run of flagged values waiting for change-point confirmation.

    Attributes:
        first_step: step of the first flagged value (it names the incident).
        first_index: its position in the channel's stream of records.
        peak_step: step of the highest flagged value so far.
        peak_value: that value.
        score: the highest robust z-score so far.
        baseline: the baseline the first flagged value was scored against.
        spread: the spread behind that score.
        after: unflagged records since the last flagged value.
    """

    first_step: int
    first_index: int
    peak_step: int
    peak_value: float
    score: float
    baseline: float
    spread: float
    after: int = 0


@dataclass(frozen=True)
class PendingCandidate:
    """A flagged excursion still waiting for confirmation (see `MetricChannel.pending`)."""

    incident: str
    onset_step: int
    peak_step: int
    after: int
    """Unflagged records seen since its last flagged value."""
