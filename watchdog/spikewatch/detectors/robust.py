"""Robust, trend-aware, one-sided spike score for a loss or grad-norm stream."""

from __future__ import annotations

import math
from collections import deque
from typing import Any

from spikewatch.detectors.window import (
    MAD_TO_SIGMA,
    RESOLUTION_TO_SIGMA,
    UNRESOLVED_STEPS,
    RollingWindow,
    decimal_step,
)
from spikewatch.errors import bad_value
from spikewatch.validation import check_float, check_int


class RobustSpikeDetector:
    """Flags values far *above* a robust, trend-following baseline.

    The baseline is the median of the last ``window`` accepted values, moved along the
    window's trend when the curve is falling (a falling loss is what training looks like,
    and a lagging median would hide spikes there). The spread is 1.4826 x MAD, so heavy
    tails and earlier spikes do not inflate it. Flagged values never enter the window,
    so a spike does not raise the bar for the next one. A drop is never a spike.

    Logged values are often rounded (the HF Trainer keeps 4 decimals, llm.c prints the
    grad norm with 2), and then the MAD of a quiet stretch is 0. The detector therefore
    tracks the data's `resolution` (the smallest non-zero step between consecutive
    accepted values; while all of them are one repeated number, the last decimal that
    number was written with) and never lets the spread fall below half a step.

    A value is a spike when ``x > baseline + threshold * spread``, it rises at least
    ``min_rise`` (a fraction of the baseline) above it, and by more than 1.5 resolution
    steps (what the log cannot resolve is never a spike). Nothing is flagged during the
    first ``warmup`` values. After ``max_consecutive`` flags in a row the values are a
    new level, not a spike: the window restarts from them and `level_shift` is set.

    Example:
        >>> import random
        >>> rng = random.Random(0)
        >>> curve = [3.0 - 0.001 * t + rng.gauss(0, 0.02) for t in range(400)]
        >>> curve[200] += 1.0   # a one-step spike
        >>> curve[300] -= 1.0   # a sudden drop: never a spike
        >>> det = RobustSpikeDetector()
        >>> hits = []
        >>> for t, x in enumerate(curve):
        ...     if det.update(x):
        ...         hits.append(t)
        >>> hits
        [200]
        >>> round(det.score, 2) < 8.0
        True

        The same on a loss of ~1e-4 logged with 4 decimals, whose MAD is 0:

        >>> tiny = [round(1e-4 * (1 + 0.3 * rng.gauss(0, 1)), 4) for _ in range(400)]
        >>> tiny[300] = 0.001   # ten times the level; 0.0002 steps are not spikes
        >>> det = RobustSpikeDetector()
        >>> [t for t, x in enumerate(tiny) if det.update(x)], det.resolution
        ([300], 0.0001)
    """

    def __init__(
        self,
        *,
        window: int = 50,
        threshold: float = 8.0,
        min_rise: float = 0.10,
        warmup: int = 50,
        min_history: int = 20,
        max_consecutive: int = 25,
        trend: bool = True,
        relative_floor: float = 1e-9,
    ) -> None:
        self.window = check_int("window", window, minimum=4)
        self.threshold = check_float("threshold", threshold, minimum=0.0, inclusive=False)
        self.min_rise = check_float("min_rise", min_rise, minimum=0.0)
        self.warmup = check_int("warmup", warmup, minimum=0)
        self.min_history = check_int("min_history", min_history, minimum=3)
        if self.min_history > self.window:
            raise bad_value("min_history", min_history, f"use a value <= window ({window})")
        self.max_consecutive = check_int("max_consecutive", max_consecutive, minimum=1)
        self.trend = bool(trend)
        self.relative_floor = check_float("relative_floor", relative_floor, minimum=0.0)
        self._window = RollingWindow(size=self.window)
        self._run: deque[float] = deque(maxlen=self.max_consecutive)
        self._seen = 0
        self._score = 0.0
        self._baseline = math.nan
        self._spread = math.nan
        self._spike = False
        self._level_shift = False
        self._resolution = 0.0
        self._step = 0.0  # the resolution step behind the last score

    # -- verdicts (read-only) -------------------------------------------------------
    @property
    def spike_detected(self) -> bool:
        """Whether the last value was flagged as a spike."""
        return self._spike

    @property
    def level_shift(self) -> bool:
        """Whether the last value completed ``max_consecutive`` flags (the level moved)."""
        return self._level_shift

    @property
    def score(self) -> float:
        """Robust z-score of the last value: (x - baseline) / spread (0 when not scored)."""
        return self._score

    @property
    def baseline(self) -> float:
        """Expected value of the last step (NaN until ``min_history`` values were seen)."""
        return self._baseline

    @property
    def spread(self) -> float:
        """Robust spread (sigma units) behind the last score."""
        return self._spread

    @property
    def resolution(self) -> float:
        """Smallest non-zero step between consecutive accepted values (0 until one is seen).

        On rounded logs this is the rounding step; on full-precision values it is tiny
        and changes nothing.
        """
        return self._resolution

    @property
    def ready(self) -> bool:
        """True once the last value was scored (enough history)."""
        return len(self._window) >= self.min_history

    @property
    def in_warmup(self) -> bool:
        """True while no alarm may be raised yet (the first ``warmup`` values)."""
        return self._seen <= self.warmup

    @property
    def level(self) -> float:
        """Median of the accepted window: the curve's current level, lag and all."""
        return self._window.median()

    @property
    def consecutive(self) -> int:
        """How many values in a row have been flagged."""
        return len(self._run)

    @property
    def steady(self) -> bool:
        """Full window, warm-up over, no flags pending: the next values may be batch-scored."""
        return len(self._window) == self.window and self._seen >= self.warmup and not self._run

    def window_values(self) -> list[float]:
        """The accepted window, oldest first."""
        return self._window.values()

    def accept_many(
        self,
        values: list[float],
        *,
        score: float,
        baseline: float,
        spread: float,
        resolution: float,
    ) -> None:
        """Advance past ``values`` that `score_run` found unflagged (``score`` etc. of the last).

        Leaves the detector exactly as calling `update` on each would have.
        """
        self._seen += len(values)
        self._window.extend(values)
        self._score, self._baseline, self._spread = score, baseline, spread
        self._resolution = resolution
        self._spike = self._level_shift = False

    # -- streaming ------------------------------------------------------------------
    def update(self, x: float) -> bool:
        """Score ``x``; return `spike_detected`. Non-finite values are ignored here."""
        self._spike = self._level_shift = False
        if not math.isfinite(x):
            self._score = 0.0
            return False
        self._seen += 1
        if not self.ready:
            self._score, self._baseline, self._spread = 0.0, math.nan, math.nan
            self._accept(x)
            return False
        self._score = self._standardise(x)
        rise = x - self._baseline
        self._spike = (
            not self.in_warmup
            and self._score > self.threshold
            and rise > self.min_rise * abs(self._baseline)
            and rise > UNRESOLVED_STEPS * self._step
        )
        if self._spike:
            self._run.append(x)
            if len(self._run) == self.max_consecutive:
                self._accept_new_level()
        else:
            self._run.clear()
            self._accept(x)
        return self._spike

    def _accept(self, x: float) -> None:
        newest = self._window.newest()
        if newest is not None:
            gap = abs(x - newest)
            if gap > 0.0 and (gap < self._resolution or self._resolution == 0.0):
                self._resolution = gap
        self._window.push(x)

    def _standardise(self, x: float) -> float:
        median = self._window.median()
        baseline = median
        mad = self._window.mad()
        if self.trend:
            slope = self._window.slope()
            if slope < 0.0:  # follow a falling loss; never chase a rising one
                # Extrapolating a sudden drop as a slope would put the baseline far below
                # the new level, so never go below the median of the newest values.
                projected = median + slope * (len(self._window) + 1) / 2.0
                baseline = max(projected, self._window.recent_median())
            if -slope * len(self._window) > mad:
                # The trend across the window rivals the noise and inflates the plain MAD;
                # noise in the slope estimate inflates the detrended one instead. Each only
                # errs upward, so the smaller is the cleaner.
                mad = min(mad, self._window.detrended_mad(slope))
        # Until two distinct values were seen the window is one repeated number: its
        # decimals are then all there is to say what a step of the log is.
        step = self._resolution or decimal_step(self._window.newest() or 0.0)
        floor = max(self.relative_floor * abs(median), 1e-12, RESOLUTION_TO_SIGMA * step)
        self._step = step
        self._baseline = baseline
        self._spread = max(MAD_TO_SIGMA * mad, floor)
        return (x - baseline) / self._spread

    def _accept_new_level(self) -> None:
        self._level_shift = True
        self._window.clear()
        for v in self._run:
            self._accept(v)
        self._run.clear()

    # -- persistence ----------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable state (settings and window)."""
        return {
            "window": self._window.state_dict(),
            "run": list(self._run),
            "seen": self._seen,
            "baseline": _or_none(self._baseline),
            "spread": _or_none(self._spread),
            "resolution": self._resolution,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict` returned; verdicts reset until the next update."""
        self._window.load_state_dict(state["window"])
        self._run = deque((float(v) for v in state["run"]), maxlen=self.max_consecutive)
        self._seen = int(state["seen"])
        self._baseline = _or_nan(state["baseline"])
        self._spread = _or_nan(state["spread"])
        self._resolution = float(state.get("resolution", 0.0))  # absent in older states
        self._spike = self._level_shift = False
        self._score = 0.0


def _or_none(x: float) -> float | None:
    return None if math.isnan(x) else x


def _or_nan(x: float | None) -> float:
    return math.nan if x is None else float(x)
