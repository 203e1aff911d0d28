"""NaN / inf detector: the cheapest and most certain signal there is."""

from __future__ import annotations

import math
from typing import Any


class NonFiniteDetector:
    """Flags NaN and +/-inf values and counts how many came in a row.

    Example:
        >>> det = NonFiniteDetector()
        >>> [t for t, x in enumerate([1.0, float("nan"), 2.0, float("inf")]) if det.update(x)]
        [1, 3]
        >>> det.consecutive
        1
    """

    def __init__(self) -> None:
        self._detected = False
        self._consecutive = 0
        self._total = 0

    @property
    def detected(self) -> bool:
        """Whether the last value was NaN or infinite."""
        return self._detected

    @property
    def consecutive(self) -> int:
        """Non-finite values in a row, ending with the last one."""
        return self._consecutive

    @property
    def total(self) -> int:
        """Non-finite values seen since creation."""
        return self._total

    def update(self, x: float) -> bool:
        """Check ``x``; return `detected`."""
        self._detected = not math.isfinite(x)
        if self._detected:
            self._consecutive += 1
            self._total += 1
        else:
            self._consecutive = 0
        return self._detected

    def passed(self) -> None:
        """Record that finite values went by (what `update` does for each of them)."""
        self._detected = False
        self._consecutive = 0

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable state."""
        return {"consecutive": self._consecutive, "total": self._total}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict` returned."""
        self._consecutive = int(state["consecutive"])
        self._total = int(state["total"])
        self._detected = False
