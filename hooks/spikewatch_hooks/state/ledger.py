"""The skip ledger: which data positions must never be trained on (again).

Positions are absolute indices in the data order (batch index since the start of the
run), so the ledger stays true after a restart from disk and across ranks.
"""

from __future__ import annotations

import bisect
from typing import Any


class SkipLedger:
    """A sorted set of half-open ranges ``[start, stop)`` of data positions.

    Example:
        >>> ledger = SkipLedger()
        >>> ledger.add(100, 130, reason="rollback at step 131")
        30
        >>> ledger.add(120, 140)
        10
        >>> 99 in ledger, 100 in ledger, 139 in ledger, 140 in ledger
        (False, True, True, False)
        >>> ledger.ranges(), len(ledger)
        ([(100, 140)], 40)
        >>> ledger
        SkipLedger(40 positions in 1 range: [100, 140))
    """

    def __init__(self) -> None:
        self._starts: list[int] = []
        self._stops: list[int] = []
        self.reasons: list[str] = []

    def add(self, start: int, stop: int, *, reason: str = "") -> int:
        """Mark ``[start, stop)`` as skipped, merging ranges; return how many are new."""
        if stop <= start:
            return 0
        before = len(self)
        i = bisect.bisect_left(self._stops, start)
        j = bisect.bisect_right(self._starts, stop)
        if i < j:
            start = min(start, self._starts[i])
            stop = max(stop, self._stops[j - 1])
        self._starts[i:j] = [start]
        self._stops[i:j] = [stop]
        if reason:
            self.reasons.append(f"[{start}, {stop}): {reason}")
        return len(self) - before

    def __contains__(self, position: object) -> bool:
        if not isinstance(position, int):
            return False
        i = bisect.bisect_right(self._starts, position) - 1
        return i >= 0 and position < self._stops[i]

    def __len__(self) -> int:
        return sum(b - a for a, b in zip(self._starts, self._stops, strict=True))

    def __repr__(self) -> str:
        ranges = self.ranges()
        shown = ", ".join(f"[{a}, {b})" for a, b in ranges[:4])
        more = f", ... ({len(ranges) - 4} more)" if len(ranges) > 4 else ""
        plural = "range" if len(ranges) == 1 else "ranges"
        body = f": {shown}{more}" if ranges else ""
        return f"SkipLedger({len(self)} positions in {len(ranges)} {plural}{body})"

    def ranges(self) -> list[tuple[int, int]]:
        """The merged ranges, in order."""
        return list(zip(self._starts, self._stops, strict=True))

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable state."""
        return {"ranges": [list(r) for r in self.ranges()], "reasons": list(self.reasons)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict` returned."""
        self._starts = [int(a) for a, _ in state["ranges"]]
        self._stops = [int(b) for _, b in state["ranges"]]
        self.reasons = [str(r) for r in state["reasons"]]
