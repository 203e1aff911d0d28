"""Slow divergence / level shift: a one-sided Page-Hinkley test on robust residuals."""

from __future__ import annotations

import math
from typing import Any

from spikewatch.validation import check_float


class PageHinkleyDetector:
    """Accumulates how far a standardised residual stays above ``delta``.

    Feed it the robust z-score of each accepted step (see `RobustSpikeDetector.score`):
    one-sided, so a falling loss (negative residuals) keeps the statistic at zero, and
    residuals are clipped at ``clip`` so a lone spike cannot trip it on its own. It
    alarms when the cumulative excess passes ``threshold``; `onset_offset` then says
    how many updates ago the excess started accumulating (the drift's onset).

    Example:
        >>> import random
        >>> rng = random.Random(1)
        >>> det = PageHinkleyDetector()
        >>> z = [rng.gauss(0, 1) for _ in range(300)] + [2.0 + rng.gauss(0, 1) for _ in range(100)]
        >>> alarms = [t for t, x in enumerate(z) if det.update(x)]
        >>> alarms[0], alarms[0] - det.onset_offset
        (317, 296)
    """

    def __init__(self, *, delta: float = 0.5, threshold: float = 30.0, clip: float = 4.0) -> None:
        self.delta = check_float("delta", delta, minimum=0.0)
        self.threshold = check_float("threshold", threshold, minimum=0.0, inclusive=False)
        self.clip = check_float("clip", clip, minimum=0.0, inclusive=False)
        self._statistic = 0.0
        self._since_zero = 0
        self._onset_offset = 0
        self._detected = False

    @property
    def drift_detected(self) -> bool:
        """Whether the last update crossed the threshold (the statistic then restarts)."""
        return self._detected

    @property
    def statistic(self) -> float:
        """Current cumulative excess (0 on a healthy stream)."""
        return self._statistic

    @property
    def onset_offset(self) -> int:
        """At the last alarm: updates between the start of the excess and the alarm."""
        return self._onset_offset

    def update(self, z: float) -> bool:
        """Add one standardised residual; return `drift_detected`. NaN is ignored."""
        self._detected = False
        if math.isnan(z):
            return False
        self._statistic = max(0.0, self._statistic + min(z, self.clip) - self.delta)
        self._since_zero = self._since_zero + 1 if self._statistic > 0.0 else 0
        if self._statistic > self.threshold:
            self._detected = True
            self._onset_offset = self._since_zero - 1
            self.reset()
        return self._detected

    def reset(self) -> None:
        """Restart the statistic (after an alarm, or after a rollback rewinds the run)."""
        self._statistic = 0.0
        self._since_zero = 0

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable state."""
        return {"statistic": self._statistic, "since_zero": self._since_zero}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict` returned."""
        self._statistic = float(state["statistic"])
        self._since_zero = int(state["since_zero"])
        self._detected = False
