"""Score alarm steps against labelled spike spans.

Rules (one curve at a time, all positions are logged steps):

* Alarms on adjacent logged points are one alarm, raised at the first of them.
* A span ``[s, e]`` is hit when an alarm lies in ``[s, e']``, ``e'`` being the logged step
  right after ``e`` ("flagged within one step"); its delay is the first such alarm - ``s``.
* An alarm inside some span's window is true; one at a borderline step is not counted;
  every other alarm is false.
* Precision = true / (true + false); recall = hits / spans. The false-alarm rate is counted
  on clean curves (no labelled span) only, per 10,000 logged points.

Example:
    >>> labels = CurveLabels(spans=((10, 10), (20, 21)), borderline=frozenset({30}))
    >>> score = score_curve(labels, alarm_steps=[11, 22, 23, 30, 40], steps=range(50))
    >>> (score.hits, score.true_alarms, score.false_alarms, score.delays)
    (2, 2, 1, (1, 2))
    >>> summarize([score]).to_json()["precision"]
    0.6666666666666666
"""

from __future__ import annotations

import bisect
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class CurveLabels:
    """Ground truth of one curve."""

    spans: tuple[tuple[int, int], ...]
    """Labelled spikes as inclusive ``(start_step, end_step)`` pairs."""
    borderline: frozenset[int] = frozenset()
    """Steps where an alarm is neither true nor false."""


@dataclass(frozen=True)
class CurveScore:
    """Counts for one detector on one curve."""

    points: int
    """Logged points in the curve."""
    spans: int
    """Labelled spans."""
    hits: int
    """Spans flagged within one step."""
    true_alarms: int
    """Merged alarms inside some span's window."""
    false_alarms: int
    """Merged alarms outside every window and not at a borderline step."""
    borderline_alarms: int
    """Merged alarms at a borderline step (not counted)."""
    delays: tuple[int, ...]
    """Detection delay in steps of every hit span, in span order."""

    @property
    def clean(self) -> bool:
        """Whether the curve has no labelled spike."""
        return self.spans == 0


@dataclass(frozen=True)
class Summary:
    """Rates over one or more curves; None where a rate is undefined (0 / 0)."""

    precision: float | None
    recall: float | None
    f1: float | None
    median_delay: float | None
    false_alarms_per_10k: float | None
    """False alarms per 10,000 logged points, on the clean curves only."""

    def to_json(self) -> dict[str, float | None]:
        """The five rates by name."""
        return {
            "precision": self.precision,
            "recall": self.recall,
            "f1": self.f1,
            "median_delay": self.median_delay,
            "false_alarms_per_10k": self.false_alarms_per_10k,
        }


def merge_alarms(alarm_steps: Iterable[int], steps: Sequence[int]) -> list[int]:
    """Keep the first step of every run of alarms on adjacent logged points.

    Example:
        >>> merge_alarms([5, 3, 4, 8, 10], steps=[0, 3, 4, 5, 8, 10])
        [3]
        >>> merge_alarms([4, 6], steps=[0, 2, 4, 6])
        [4]
    """
    alarms = sorted(set(alarm_steps))
    alarmed = set(alarms)
    merged = []
    for step in alarms:
        i = bisect.bisect_left(steps, step)
        on_grid = i < len(steps) and steps[i] == step
        if not (on_grid and i > 0 and steps[i - 1] in alarmed):
            merged.append(step)
    return merged


def span_windows(spans: Iterable[tuple[int, int]], steps: Sequence[int]) -> list[tuple[int, int]]:
    """``(start, last step that still counts)`` of each span: one logged step past its end.

    Example:
        >>> span_windows([(10, 10), (20, 30), (40, 40)], steps=[0, 10, 20, 30, 35, 40])
        [(10, 20), (20, 35), (40, 40)]
    """
    windows = []
    for start, end in spans:
        i = bisect.bisect_right(steps, end)
        windows.append((start, steps[i] if i < len(steps) else end))
    return windows


def score_curve(
    labels: CurveLabels, alarm_steps: Iterable[int], steps: Sequence[int]
) -> CurveScore:
    """Count hits, delays and true / false / borderline alarms on one curve.

    Args:
        labels: The curve's labelled spans and borderline steps.
        alarm_steps: Steps at which the detector alarmed (any order, repeats allowed).
        steps: The curve's logged steps, strictly increasing.
    """
    alarms = merge_alarms(alarm_steps, steps)
    windows = span_windows(labels.spans, steps)
    delays = []
    for start, last in windows:
        first = next((a for a in alarms if start <= a <= last), None)
        if first is not None:
            delays.append(first - start)
    true = sum(1 for a in alarms if any(s <= a <= e for s, e in windows))
    borderline = sum(
        1 for a in alarms if a in labels.borderline and not any(s <= a <= e for s, e in windows)
    )
    return CurveScore(
        points=len(steps),
        spans=len(windows),
        hits=len(delays),
        true_alarms=true,
        false_alarms=len(alarms) - true - borderline,
        borderline_alarms=borderline,
        delays=tuple(delays),
    )


def summarize(scores: Iterable[CurveScore]) -> Summary:
    """Pool the counts of several curves (or one) into rates.

    Example:
        >>> clean = CurveScore(20_000, 0, 0, 0, 3, 1, ())
        >>> summarize([clean]).false_alarms_per_10k
        1.5
    """
    pooled = list(scores)
    spans = sum(s.spans for s in pooled)
    hits = sum(s.hits for s in pooled)
    true = sum(s.true_alarms for s in pooled)
    counted = true + sum(s.false_alarms for s in pooled)
    precision = true / counted if counted else None
    recall = hits / spans if spans else None
    f1: float | None = None
    if recall is not None:
        p = precision or 0.0
        f1 = 2 * p * recall / (p + recall) if p + recall > 0 else 0.0
    delays = [d for s in pooled for d in s.delays]
    clean = [s for s in pooled if s.clean]
    clean_points = sum(s.points for s in clean)
    fa_rate = None
    if clean_points:
        fa_rate = 10_000 * sum(s.false_alarms for s in clean) / clean_points
    return Summary(
        precision=precision,
        recall=recall,
        f1=f1,
        median_delay=float(statistics.median(delays)) if delays else None,
        false_alarms_per_10k=fa_rate,
    )
