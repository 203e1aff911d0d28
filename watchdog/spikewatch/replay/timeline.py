"""The decision timeline of a replay as text: every decision, in the order it was taken."""

from __future__ import annotations

from spikewatch.replay.model import ReplayDecision, ReplayReport

_COLUMNS = ("step", "action", "metric", "signal", "restore", "lr", "incident", "reason")
_NUMERIC = {0, 4, 5}  # right-aligned, so digits line up


def format_decisions(report: ReplayReport) -> str:
    """The decisions as an aligned text table (a header, then one line per decision).

    ``restore`` is the step a rollback restores to (at or before), ``lr`` its
    learning-rate factor; the reason comes last, unpadded.

    Example:
        >>> d = ReplayDecision(step=1243, action="rollback", reason="divergence",
        ...                    incident="loss-divergence-1047", metric="loss",
        ...                    kind="divergence", rollback_before_step=947, lr_factor=0.5)
        >>> print(format_decisions(ReplayReport(points=1600, decisions=[d])))
        step  action    metric  signal      restore   lr  incident              reason
        1243  rollback  loss    divergence      947  0.5  loss-divergence-1047  divergence
    """
    rows = [_COLUMNS, *(_row(d) for d in report.decisions)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(_COLUMNS))]
    last = len(_COLUMNS) - 1
    lines = []
    for n, row in enumerate(rows):
        cells = [
            cell if i == last else cell.rjust(w) if i in _NUMERIC and n else cell.ljust(w)
            for i, (cell, w) in enumerate(zip(row, widths, strict=True))
        ]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def _row(d: ReplayDecision) -> tuple[str, ...]:
    restore = "-" if d.rollback_before_step is None else str(d.rollback_before_step)
    return (
        str(d.step),
        d.action,
        d.metric,
        d.kind,
        restore,
        f"{d.lr_factor:g}",
        d.incident,
        d.reason,
    )
