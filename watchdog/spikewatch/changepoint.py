"""Stage 2: confirm and localise a stage-1 candidate with change-point analysis (ruptures).

Runs on a capped window around a candidate, off the training thread: finds where the
excursion began (the onset, which decides how far a rollback goes), where it ended,
and whether the curve came back to its pre-spike level (transient) or stayed up.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import ruptures

from spikewatch.validation import check_float, check_int


@dataclass(frozen=True)
class Localisation:
    """Where an excursion sits inside the analysed window (indices into that window).

    ``end`` is the last elevated index, or None when the window ends still elevated.
    ``shift`` is the post-excursion level minus the pre-excursion baseline, in the
    curve's units (0 when nothing follows the excursion yet).
    """

    onset: int
    peak: int
    end: int | None
    transient: bool
    shift: float
    breakpoints: tuple[int, ...]


class ChangePointLocaliser:
    """Segments a window with `ruptures.KernelCPD` (linear kernel: the C-backed l2 cost).

    A segment is *elevated* when its median exceeds ``baseline + elevated * spread``.
    The excursion is the run of elevated segments around the candidate index; it is
    transient when the values after it are back below that line.

    Example:
        >>> import random
        >>> rng = random.Random(3)
        >>> base = [2.0 + rng.gauss(0, 0.02) for _ in range(80)]
        >>> spike = base[:60] + [3.0, 2.6] + base[62:]
        >>> loc = ChangePointLocaliser().localise(spike, 60, baseline=2.0, spread=0.02)
        >>> loc.onset, loc.peak, loc.end, loc.transient
        (60, 60, 61, True)
        >>> shifted = base[:60] + [x + 0.5 for x in base[60:]]
        >>> loc = ChangePointLocaliser().localise(shifted, 60, baseline=2.0, spread=0.02)
        >>> loc.onset, loc.end, loc.transient
        (60, None, False)
    """

    def __init__(self, *, penalty: float = 3.0, elevated: float = 4.0, min_points: int = 8) -> None:
        self.penalty = check_float("penalty", penalty, minimum=0.0, inclusive=False)
        self.elevated = check_float("elevated", elevated, minimum=0.0)
        self.min_points = check_int("min_points", min_points, minimum=3)

    def localise(
        self, values: Sequence[float], candidate: int, *, baseline: float, spread: float
    ) -> Localisation:
        """Localise the excursion that contains ``values[candidate]``.

        Non-finite values count as maximally elevated. Windows shorter than
        ``min_points`` are judged point by point instead of by ruptures.
        """
        n = len(values)
        if not 0 <= candidate < n:
            raise IndexError(f"candidate={candidate} is outside the window of {n} values")
        spread = spread if spread > 0 and math.isfinite(spread) else 1e-12
        line = baseline + self.elevated * spread
        clean = _finite_or(values, ceiling=baseline + 1e3 * spread)
        bkps = self._breakpoints(clean, spread)
        segments = list(zip((0, *bkps[:-1]), bkps, strict=True))
        up = [statistics.median(clean[a:b]) > line for a, b in segments]
        k = next(i for i, (a, b) in enumerate(segments) if a <= candidate < b)
        if not up[k]:  # ruptures merged the candidate away: judge it alone
            return self._single(clean, candidate, line, baseline, bkps)
        first, last = k, k
        while first > 0 and up[first - 1]:
            first -= 1
        while last < len(segments) - 1 and up[last + 1]:
            last += 1
        onset, stop = segments[first][0], segments[last][1]
        peak = max(range(onset, stop), key=clean.__getitem__)
        final = statistics.median(clean[segments[last][0] : stop])
        return _finish(clean, onset, peak, stop, levels=(line, baseline, final), bkps=tuple(bkps))

    def _breakpoints(self, clean: list[float], spread: float) -> list[int]:
        n = len(clean)
        if n < self.min_points:
            return list(range(1, n + 1))
        signal = np.asarray(clean, dtype=float).reshape(-1, 1)
        algo = ruptures.KernelCPD(kernel="linear", min_size=1, jump=1).fit(signal)
        pen = self.penalty * spread * spread * math.log(n)
        return [int(b) for b in algo.predict(pen=pen)]

    def _single(
        self, clean: list[float], i: int, line: float, baseline: float, bkps: list[int]
    ) -> Localisation:
        stop = i + 1
        while stop < len(clean) and clean[stop] > line:
            stop += 1
        final = statistics.median(clean[min(i + 1, stop - 1) : stop])
        return _finish(clean, i, i, stop, levels=(line, baseline, final), bkps=tuple(bkps))


def _finish(
    clean: list[float],
    onset: int,
    peak: int,
    stop: int,
    *,
    levels: tuple[float, float, float],
    bkps: tuple[int, ...],
) -> Localisation:
    """Build the result; ``levels`` is (elevated line, baseline, level of the last segment)."""
    line, baseline, final = levels
    after = clean[stop:]
    if not after:  # still elevated when the window ends: the shift is the final level
        return Localisation(onset, peak, None, False, final - baseline, bkps)
    level = statistics.median(after)
    return Localisation(onset, peak, stop - 1, level <= line, level - baseline, bkps)


def _finite_or(values: Sequence[float], *, ceiling: float) -> list[float]:
    return [float(v) if math.isfinite(v) else ceiling for v in values]
