"""The change-point sweep: find persistent level shifts the streaming detectors let by.

Stage 1 sees one step at a time; a slow, stepwise climb can stay under its thresholds.
Every few minutes the service looks at each run's recent curve as a whole with
``ruptures.KernelCPD`` (linear kernel: the l2 cost, with a C implementation) and
reports the newest segment when it sits clearly above the one before it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import pairwise

import numpy as np
import ruptures

from spikewatch.detectors.window import MAD_TO_SIGMA


@dataclass(frozen=True, slots=True)
class LevelShift:
    """A persistent rise of the newest segment over the previous one."""

    onset_step: int
    before: float
    after: float
    sigma: float

    @property
    def score(self) -> float:
        """The rise in noise units."""
        return (self.after - self.before) / self.sigma


def find_level_shift(
    steps: Sequence[int],
    values: Sequence[float],
    *,
    penalty: float = 3.0,
    elevated: float = 4.0,
    min_rise: float = 0.10,
    min_size: int = 20,
) -> LevelShift | None:
    """The newest persistent upward level shift in ``values``, or None.

    Args:
        steps, values: the curve (non-finite values are left out).
        penalty: ruptures penalty in units of sigma^2 * log(n).
        elevated: the new level must be this many sigmas above the old one...
        min_rise: ...and this fraction above it.
        min_size: shortest segment considered (steps).

    Example:
        >>> import random
        >>> rng = random.Random(0)
        >>> ys = [2.0 + rng.gauss(0, 0.02) for _ in range(300)]
        >>> ys += [2.6 + rng.gauss(0, 0.02) for _ in range(100)]
        >>> shift = find_level_shift(range(400), ys)
        >>> shift.onset_step, round(shift.after - shift.before, 1)
        (300, 0.6)
        >>> find_level_shift(range(300), ys[:300]) is None
        True
    """
    pairs = [(s, v) for s, v in zip(steps, values, strict=True) if math.isfinite(v)]
    if len(pairs) < 4 * min_size:
        return None
    x = np.asarray([v for _, v in pairs], dtype=np.float64)
    # Noise from first differences: a level shift or trend barely moves it.
    sigma = (
        MAD_TO_SIGMA * float(np.median(np.abs(np.diff(x) - np.median(np.diff(x))))) / math.sqrt(2.0)
    )
    sigma = max(sigma, 1e-12 * max(1.0, float(np.median(np.abs(x)))))
    algo = ruptures.KernelCPD(kernel="linear", min_size=min_size).fit(x)
    bkps = algo.predict(pen=penalty * sigma**2 * math.log(len(x)))
    if len(bkps) < 2:
        return None
    # Medians of the segments; walk back over a staircase of rising segments to the
    # level before it, so a rise in several steps counts in full.
    bounds = [0, *bkps]
    medians = [float(np.median(x[a:b])) for a, b in pairwise(bounds)]
    first = len(medians) - 1
    while first > 0 and medians[first - 1] < medians[first]:
        first -= 1
    if first == len(medians) - 1:
        return None
    start = bounds[first + 1]
    before, after = medians[first], medians[-1]
    rise = after - before
    if rise <= elevated * sigma or rise <= min_rise * abs(before):
        return None
    return LevelShift(onset_step=pairs[start][0], before=before, after=after, sigma=sigma)
