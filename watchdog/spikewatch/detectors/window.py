"""A bounded window of recent values with an exact rolling median, MAD and trend.

Kept sorted incrementally (`bisect`), so one update costs O(window) memmove at worst
and a few microseconds at the default window of 50.
"""

from __future__ import annotations

import bisect
import itertools
from collections import deque
from typing import Any

from spikewatch.validation import check_int

#: 1.4826 x MAD estimates the standard deviation of normal data; robust to outliers.
MAD_TO_SIGMA = 1.4826

#: The spread never falls below this many resolution steps. A log rounded to a step q
#: hides any noise smaller than about q/2, so a MAD of 0 on rounded values means
#: "below the resolution", not "no noise" (a plain MAD then scores one step at 1e8).
RESOLUTION_TO_SIGMA = 0.5

#: A rise must exceed this many resolution steps to count (one step, plus slack for the
#: float error of differences on the grid): a change the log cannot resolve is no signal.
UNRESOLVED_STEPS = 1.5


class RollingWindow:
    """The last ``size`` values, with order statistics.

    Example:
        >>> w = RollingWindow(size=5)
        >>> for x in [3.0, 1.0, 4.0, 1.0, 5.0, 9.0]:
        ...     w.push(x)
        >>> len(w), w.median(), w.mad()
        (5, 4.0, 3.0)
        >>> round(w.slope(), 3)
        1.5
    """

    def __init__(self, *, size: int) -> None:
        self.size = check_int("size", size, minimum=3)
        self._values: deque[float] = deque()
        self._sorted: list[float] = []

    def __len__(self) -> int:
        return len(self._values)

    def push(self, x: float) -> None:
        """Add ``x``, evicting the oldest value when full."""
        if len(self._values) == self.size:
            old = self._values.popleft()
            del self._sorted[bisect.bisect_left(self._sorted, old)]
        self._values.append(x)
        bisect.insort(self._sorted, x)

    def extend(self, values: list[float]) -> None:
        """Push each of ``values`` in order (rebuilt in one sort when they fill the window)."""
        if len(values) < self.size:
            for x in values:
                self.push(x)
            return
        self._values = deque(values[-self.size :])
        self._sorted = sorted(self._values)

    def clear(self) -> None:
        """Forget every value."""
        self._values.clear()
        self._sorted.clear()

    def median(self) -> float:
        """Median of the window (NaN when empty)."""
        s = self._sorted
        n = len(s)
        if n == 0:
            return float("nan")
        mid = n // 2
        return s[mid] if n % 2 else 0.5 * (s[mid - 1] + s[mid])

    def mad(self) -> float:
        """Median absolute deviation from the median (unscaled)."""
        m = self.median()
        return _median_sorted(sorted([abs(v - m) for v in self._sorted]))

    def detrended_mad(self, slope: float) -> float:
        """MAD of the window after removing a linear trend of ``slope`` per step.

        On a falling curve the plain MAD mixes the trend into the noise and hides
        spikes; the residuals around the trend line measure the noise alone.
        """
        centre = (len(self._values) - 1) / 2.0
        residuals = sorted([v - slope * (j - centre) for j, v in enumerate(self._values)])
        m = _median_sorted(residuals)
        return _median_sorted(sorted([abs(r - m) for r in residuals]))

    def slope(self) -> float:
        """Per-step trend: (median of newer half - median of older half) / half length."""
        n = len(self._values)
        half = n // 2
        if half < 2:
            return 0.0
        older = sorted(itertools.islice(self._values, 0, half))
        newer = sorted(itertools.islice(self._values, n - half, n))
        return (_median_sorted(newer) - _median_sorted(older)) / (n - half)

    def recent_median(self) -> float:
        """Median of the newest quarter of the window (at least 3 values)."""
        n = len(self._values)
        k = min(n, max(3, n // 4))
        return _median_sorted(sorted(itertools.islice(self._values, n - k, n)))

    def newest(self) -> float | None:
        """The value pushed last (None when empty)."""
        return self._values[-1] if self._values else None

    def values(self) -> list[float]:
        """The window, oldest first."""
        return list(self._values)

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable state."""
        return {"size": self.size, "values": list(self._values)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict` returned."""
        self.size = check_int("size", state["size"], minimum=3)
        self.clear()
        for x in state["values"]:
            self.push(float(x))


def decimal_step(x: float) -> float:
    """One unit in the last decimal place of ``x`` as written (0.0 for a whole number).

    What a value alone says about the log's resolution: ``0.0001`` was printed with 4
    decimals. The fallback while every value seen so far is the same number.

    Example:
        >>> decimal_step(0.0002), decimal_step(2.5), decimal_step(1.5e-07), decimal_step(3.0)
        (0.0001, 0.1, 1e-08, 0.0)
    """
    mantissa, _, exponent = repr(abs(x)).partition("e")
    decimals = len(mantissa.partition(".")[2].rstrip("0")) - int(exponent or 0)
    return 10.0**-decimals if decimals > 0 else 0.0


def _median_sorted(s: list[float]) -> float:
    n = len(s)
    if n == 0:
        return float("nan")
    mid = n // 2
    return s[mid] if n % 2 else 0.5 * (s[mid - 1] + s[mid])
