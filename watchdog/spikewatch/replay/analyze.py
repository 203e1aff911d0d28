"""Run a logged curve through the monitor, exactly as a live run would be watched."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from spikewatch.monitor import Monitor
from spikewatch.records import Decision
from spikewatch.replay.model import Curve, ReplayDecision, ReplayEvent, ReplayReport
from spikewatch.settings import MonitorConfig

#: How often (in records) ``analyze`` reports progress.
PROGRESS_EVERY = 1000


def analyze(
    curve: Curve,
    *,
    config: MonitorConfig | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> ReplayReport:
    """Replay ``curve`` through a `Monitor`: its incidents as events, every decision in order.

    The records go through `Monitor.observe_many` (the same decisions as one `observe`
    per record, faster). A grad norm of None (not logged at that step) is no value. A
    candidate the curve ends on is reported ``unresolved``: no data, no decision.

    Example:
        >>> import random
        >>> rng = random.Random(0)
        >>> steps = list(range(600))
        >>> loss = [5.0 - 0.003 * s + rng.gauss(0, 0.05) for s in steps]
        >>> loss[300] += 2.0
        >>> loss[597] += 2.0   # three records before the end: never confirmed
        >>> report = analyze(Curve(path="x.csv", format="csv", steps=steps, loss=loss))
        >>> [(e.kind, e.onset_step, e.end_step, e.transient, e.action) for e in report.events]
        [('spike', 300, 300, True, 'watch'), ('unresolved', 597, None, None, 'watch')]
        >>> [(d.step, d.action, d.incident) for d in report.decisions]
        [(300, 'watch', 'loss-spike-300'), (308, 'watch', 'loss-spike-300'),
         (597, 'watch', 'loss-spike-597')]
    """
    monitor = Monitor(run=curve.path, config=config)
    total = len(curve)
    grads: Sequence[float | None] = curve.grad_norm or [None] * total
    decisions: list[Decision] = []
    for start in range(0, total, PROGRESS_EVERY):
        stop = min(start + PROGRESS_EVERY, total)
        decisions += monitor.observe_columns(
            curve.steps[start:stop], curve.loss[start:stop], grads[start:stop]
        )
        if progress is not None and stop < total:
            progress(stop, total)
    monitor.flush()
    if progress is not None:
        progress(total, total)
    return ReplayReport(
        points=total,
        events=[ReplayEvent.from_incident(inc) for inc in monitor.incidents],
        decisions=[ReplayDecision.from_decision(d) for d in decisions],
    )
