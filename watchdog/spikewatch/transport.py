"""How records reach a monitor and decisions come back.

The embedded transport runs the `Monitor` in the training process: no server, no thread,
decisions on the same step. (The HTTP transport to `spikewatch serve` has the same shape.)
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, Protocol

from spikewatch.forensics.verdict import Verdict
from spikewatch.monitor import Monitor
from spikewatch.records import Decision, StepRecord

log = logging.getLogger(__name__)


class Transport(Protocol):
    """What a trainer hook talks to."""

    def submit(self, records: Sequence[StepRecord]) -> list[Decision]:
        """Hand over records; return the decisions that are due (never raises)."""
        ...

    def detector_state(self) -> dict[str, Any]:
        """State to keep with a snapshot, so a rollback can rewind detection too."""
        ...

    def rewind(self, state: dict[str, Any]) -> None:
        """Rewind detection to a `detector_state` (after a rollback)."""
        ...

    def incidents(self) -> int:
        """How many incidents the monitor has opened for this run."""
        ...

    def skip_threshold(self) -> float:
        """Grad norm above which an update should be skipped (inf when unknown)."""
        ...


class EmbeddedTransport:
    """Runs a `Monitor` inline; a monitor failure is logged and counted, never raised.

    Example:
        >>> t = EmbeddedTransport(Monitor(run="r"))
        >>> t.submit([StepRecord(run="r", step=0, loss=float("nan"))])[0].action
        'skip_step'
    """

    def __init__(self, monitor: Monitor) -> None:
        self.monitor = monitor
        self.failures = 0

    def submit(self, records: Sequence[StepRecord]) -> list[Decision]:
        """Observe each record; return every non-``watch`` decision."""
        out: list[Decision] = []
        try:
            for record in records:
                out.extend(d for d in self.monitor.observe(record) if d.action != "watch")
        except Exception:
            # Fail open: training must never stop because the monitor has a bug.
            self.failures += 1
            log.exception("spikewatch monitor failed; training continues unwatched for now")
        return out

    def detector_state(self) -> dict[str, Any]:
        """The monitor's detector state."""
        return self.monitor.detector_state()

    def rewind(self, state: dict[str, Any]) -> None:
        """Rewind the monitor's detectors."""
        self.monitor.rewind(state)

    def incidents(self) -> int:
        """Incidents opened so far."""
        return len(self.monitor.incidents)

    def skip_threshold(self) -> float:
        """The monitor's current grad-norm skip threshold."""
        return self.monitor.skip_threshold()

    def judge(self, decision: Decision, verdict: Verdict) -> tuple[Decision, Verdict]:
        """The monitor keeps the forensics verdict and says what the rollback becomes."""
        return self.monitor.adopt_verdict(decision, verdict)
