"""Run a logged curve through the monitor, exactly as a live run would be watched."""

from __future__ import annotations

from collections.abc import Callable

from spikewatch.monitor import Monitor
from spikewatch.records import StepRecord
from spikewatch.replay.model import Curve, ReplayEvent, ReplayReport
from spikewatch.settings import MonitorConfig

#: How often (in records) ``analyze`` reports progress.
PROGRESS_EVERY = 1000


def analyze(
    curve: Curve,
    *,
    config: MonitorConfig | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> ReplayReport:
    """Replay ``curve`` through a `Monitor` and report its incidents as events.

    Example:
        >>> import random
        >>> rng = random.Random(0)
        >>> steps = list(range(600))
        >>> loss = [5.0 - 0.003 * s + rng.gauss(0, 0.05) for s in steps]
        >>> loss[300] += 2.0
        >>> report = analyze(Curve(path="x.csv", format="csv", steps=steps, loss=loss))
        >>> [(e.kind, e.onset_step, e.end_step, e.transient, e.action) for e in report.events]
        [('spike', 300, 300, True, 'watch')]
    """
    monitor = Monitor(run=curve.path, config=config)
    total = len(curve)
    grads = curve.grad_norm
    lrs = curve.lr
    for i, step in enumerate(curve.steps):
        monitor.observe(
            StepRecord(
                run=monitor.run,
                step=step,
                loss=curve.loss[i],
                grad_norm=None if grads is None else grads[i],
                lr=None if lrs is None else lrs[i],
            )
        )
        if progress is not None and (i + 1) % PROGRESS_EVERY == 0:
            progress(i + 1, total)
    monitor.flush()
    if progress is not None:
        progress(total, total)
    events = [ReplayEvent.from_incident(inc) for inc in monitor.incidents]
    return ReplayReport(points=total, events=events)
