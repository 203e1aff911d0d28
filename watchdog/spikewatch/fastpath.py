"""The batch path through a channel: plan how many values are routine, then advance past them.

A value is *routine* when the streaming path would raise no signal for it and change no
episode: it is finite, unflagged, and (on the loss channel) does not trip Page-Hinkley.
For such values only counters, the window and the drift statistic move, which this
module does in bulk. Everything else goes through `MetricChannel.update` unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from spikewatch.detectors.batch import RunScores, score_run
from spikewatch.detectors.drift import PageHinkleyDetector
from spikewatch.detectors.robust import RobustSpikeDetector

#: Most values scored per vectorised call: bounds the work wasted past a flag.
MAX_RUN = 512


@dataclass(slots=True)
class DriftState:
    """The loss channel's drift bookkeeping, walked value by value (cheap scalar maths)."""

    statistic: float
    since_zero: int
    best_level: float
    best_step: int
    drift_onset: int


@dataclass(slots=True)
class RoutinePlan:
    """Scores for a run of values and how many of them, from the start, are routine.

    ``drift_after`` is the drift state after the ``usable`` values (loss channel only).
    """

    steps: list[int]
    values: list[float]
    scores: RunScores
    usable: int
    drift_after: DriftState | None = None


def plan_run(
    detector: RobustSpikeDetector, steps: list[int], values: list[float]
) -> RoutinePlan | None:
    """Score ``values`` in bulk; None when the detector is not steady (warm-up, episode)."""
    if not detector.steady:
        return None
    array = np.asarray(values, dtype=np.float64)
    bad = np.flatnonzero(~np.isfinite(array))
    finite = int(bad[0]) if bad.size else len(values)
    if finite == 0:
        return None
    array = array[:finite]
    scores = score_run(
        detector.window_values(),
        array,
        threshold=detector.threshold,
        min_rise=detector.min_rise,
        trend=detector.trend,
        relative_floor=detector.relative_floor,
        resolution=detector.resolution,
    )
    return RoutinePlan(steps[:finite], values[:finite], scores, scores.first_flag())


def walk_drift(
    state: DriftState, plan: RoutinePlan, drift: PageHinkleyDetector, limit: int
) -> tuple[int, DriftState]:
    """Advance the drift bookkeeping over up to ``limit`` planned values.

    Stops *before* the first value whose Page-Hinkley update would alarm (the streaming
    path handles that one) and returns how many values went by and the state after them.
    Repeats `MetricChannel._on_accepted` operation for operation: the statistic in a
    scalar loop (a recursion), the best level with exact vectorised minima.
    """
    clipped = np.minimum(plan.scores.score[:limit], drift.clip).tolist()
    statistic, since_zero, onset = state.statistic, state.since_zero, state.drift_onset
    threshold, delta, steps = drift.threshold, drift.delta, plan.steps
    count = limit
    for i, z in enumerate(clipped):
        new = statistic + z - delta  # the streaming order of operations, for equal rounding
        if new <= 0.0:
            statistic, since_zero = 0.0, 0
            continue
        if new > threshold:
            count = i
            break
        if statistic == 0.0:
            onset = steps[i]
        statistic, since_zero = new, since_zero + 1
    if count == 0:
        return 0, state
    levels = plan.scores.level_after[:count]
    best = np.minimum.accumulate(np.concatenate([[state.best_level], levels]))[1:]
    at_best = np.flatnonzero(levels <= best + plan.scores.spread[:count])
    best_step = steps[int(at_best[-1])] if at_best.size else state.best_step
    return count, DriftState(statistic, since_zero, float(best[-1]), best_step, onset)
