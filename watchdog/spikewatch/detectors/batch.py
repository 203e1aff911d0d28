"""Vectorised scoring of a run of values, bit-for-bit equal to `RobustSpikeDetector.update`.

The service ingests batches of hundreds of records per request. Scoring them one at a
time costs ~10 µs per value in Python (two sorts of the window per value); scoring a
whole run of values at once with NumPy costs ~1 µs. The catch: the window only holds
*accepted* values, so the vectorised scores are exact only up to the first flagged
value. `score_run` therefore returns scores for the whole run and the caller uses the
prefix before the first flag, then falls back to the streaming path for that value.

Every operation below repeats the streaming code's float operations in the same order
(same medians of the same sorted values, same products and divisions), so the results
are identical, not merely close; a property test holds both paths to that.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view
from numpy.typing import NDArray

from spikewatch.detectors.window import (
    MAD_TO_SIGMA,
    RESOLUTION_TO_SIGMA,
    UNRESOLVED_STEPS,
    decimal_step,
)

Floats = NDArray[np.float64]


@dataclass(frozen=True, slots=True)
class RunScores:
    """Per-value results of `score_run`, valid up to (excluding) the first flag.

    Attributes:
        score: robust z-score of each value.
        baseline: the expected value each was scored against.
        spread: the robust spread (sigma units) behind each score.
        level_after: median of the window after each value was accepted.
        flagged: whether each value is a spike (warm-up already over).
        resolution_after: the detector's resolution after each value was accepted.
    """

    score: Floats
    baseline: Floats
    spread: Floats
    level_after: Floats
    flagged: NDArray[np.bool_]
    resolution_after: Floats

    def first_flag(self) -> int:
        """Index of the first flagged value (the run's length when none is)."""
        hits = np.flatnonzero(self.flagged)
        return int(hits[0]) if hits.size else int(self.flagged.size)


def score_run(
    window: list[float],
    values: Floats,
    *,
    threshold: float,
    min_rise: float,
    trend: bool,
    relative_floor: float,
    resolution: float = 0.0,
) -> RunScores:
    """Score ``values`` in order against a full ``window``, assuming each is accepted.

    Args:
        window: the detector's current window, oldest first (full: ``len == size``).
        values: finite values to score, in arrival order.
        threshold, min_rise, trend, relative_floor: the detector's settings.
        resolution: the detector's `resolution` before the first value.

    Example:
        >>> import numpy as np
        >>> from spikewatch.detectors.robust import RobustSpikeDetector
        >>> det = RobustSpikeDetector(window=8, min_history=8, warmup=0, trend=False)
        >>> for x in [1.0, 1.1, 0.9, 1.05, 0.95, 1.0, 1.02, 0.98]:
        ...     _ = det.update(x)
        >>> out = score_run(det.window_values(), np.array([1.01, 9.0, 1.0]), threshold=8.0,
        ...                 min_rise=0.1, trend=False, relative_floor=1e-9,
        ...                 resolution=det.resolution)
        >>> out.first_flag(), round(float(out.score[1]), 1)
        (1, 154.1)
        >>> for x in [1.01, 9.0]:
        ...     _ = det.update(x)
        >>> det.score == float(out.score[1])   # the streaming path, bit for bit
        True
    """
    size = len(window)
    combined = np.concatenate([np.asarray(window, dtype=np.float64), values])
    rows = sliding_window_view(combined, size)  # row i: the window before value i
    ordered = np.sort(rows, axis=1)
    median = _median_of_sorted(ordered)
    k = values.size
    med = median[:k]
    mad = _median_of_sorted(np.sort(np.abs(ordered[:k] - med[:, None]), axis=1))
    baseline = med
    if trend:
        slope = _slope(rows[:k])
        projected = med + slope * (size + 1) / 2.0
        recent = _median_of_sorted(np.sort(rows[:k, size - max(3, size // 4) :], axis=1))
        baseline = np.where(slope < 0.0, np.maximum(projected, recent), med)
        noisy = -slope * size > mad
        if noisy.any():
            detrended = _detrended_mad(rows[:k][noisy], slope[noisy])
            mad = mad.copy()
            mad[noisy] = np.minimum(mad[noisy], detrended)
    steps = _resolution_after(window[-1], values, resolution)
    before = steps[:-1].copy()
    for i in np.flatnonzero(before == 0.0):  # no step seen yet: see `_standardise`
        before[i] = decimal_step(float(rows[i, -1]))
    floor = np.maximum(
        np.maximum(relative_floor * np.abs(med), 1e-12), RESOLUTION_TO_SIGMA * before
    )
    spread = np.maximum(MAD_TO_SIGMA * mad, floor)
    rise = values - baseline
    score = rise / spread
    flagged = (
        (score > threshold)
        & (rise > min_rise * np.abs(baseline))
        & (rise > UNRESOLVED_STEPS * before)
    )
    return RunScores(score, baseline, spread, median[1:], flagged, steps[1:])


def _resolution_after(newest: float, values: Floats, resolution: float) -> Floats:
    """The resolution before the first value, then after each: a running minimum of the
    non-zero steps between consecutive values (0 while none was seen), as `_accept` does."""
    previous = np.concatenate([[newest], values[:-1]])
    gaps = np.abs(values - previous)
    gaps[gaps == 0.0] = np.inf
    start = resolution if resolution > 0.0 else np.inf
    running = np.minimum.accumulate(np.concatenate([[start], gaps]))
    running[np.isinf(running)] = 0.0
    return running


def _median_of_sorted(ordered: Floats) -> Floats:
    n = ordered.shape[1]
    mid = n // 2
    if n % 2:
        return ordered[:, mid].copy()
    return 0.5 * (ordered[:, mid - 1] + ordered[:, mid])


def _slope(rows: Floats) -> Floats:
    n = rows.shape[1]
    half = n // 2
    if half < 2:
        return np.zeros(rows.shape[0])
    older = _median_of_sorted(np.sort(rows[:, :half], axis=1))
    newer = _median_of_sorted(np.sort(rows[:, n - half :], axis=1))
    slope: Floats = (newer - older) / (n - half)
    return slope


def _detrended_mad(rows: Floats, slope: Floats) -> Floats:
    n = rows.shape[1]
    offsets = np.arange(n) - (n - 1) / 2.0
    residuals = np.sort(rows - slope[:, None] * offsets[None, :], axis=1)
    m = _median_of_sorted(residuals)
    return _median_of_sorted(np.sort(np.abs(residuals - m[:, None]), axis=1))
