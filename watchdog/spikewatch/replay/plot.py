"""Draw a replayed curve and the events found in it into an image file.

The figure is built on a private `Figure` with an Agg canvas, so plotting never
touches pyplot's global state or the process-wide matplotlib backend.
"""

from __future__ import annotations

import math
import os
from bisect import bisect_left
from collections import Counter
from collections.abc import Sequence

from matplotlib.artist import Artist
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from spikewatch.replay.model import Curve, ReplayEvent, ReplayReport

#: Event colours by policy action: hotter means a stronger intervention.
ACTION_COLORS = {
    "watch": "#e6a100",
    "skip_step": "#8e44ad",
    "rollback": "#d62728",
    "halt": "#111111",
}
_OTHER_COLOR = "#7f7f7f"
_LOSS_COLOR = "#1f77b4"
_GRAD_COLOR = "#2ca02c"


def _finite(values: Sequence[float]) -> list[float]:
    """``values`` with NaN/inf turned into NaN, which matplotlib draws as a gap."""
    return [v if math.isfinite(v) else math.nan for v in values]


def _wants_log(values: Sequence[float]) -> bool:
    """True when all finite values are positive and span more than two decades."""
    finite = [v for v in values if math.isfinite(v)]
    return bool(finite) and min(finite) > 0 and max(finite) / min(finite) > 100.0


def _draw_loss(ax: Axes, curve: Curve, handles: list[Artist]) -> None:
    width = 0.6 if len(curve) > 5000 else 1.0
    (line,) = ax.plot(curve.steps, _finite(curve.loss), lw=width, color=_LOSS_COLOR, label="loss")
    handles.append(line)
    bad = [s for s, v in zip(curve.steps, curve.loss, strict=True) if not math.isfinite(v)]
    if bad:
        # Non-finite values have no height: mark them along the top edge of the plot.
        marks = ax.scatter(
            bad, [0.97] * len(bad), marker="x", s=30, color="#d62728", zorder=4,
            transform=ax.get_xaxis_transform(), label=f"loss NaN/inf ({len(bad)})",
        )  # fmt: skip
        handles.append(marks)
    if _wants_log(curve.loss):
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.margins(x=0.01)


def _logged(curve: Curve) -> tuple[list[int], list[float]]:
    """The steps a grad norm was logged at and its values (a sparse column's gaps dropped,
    so a grad norm logged every 10th step still draws as a line)."""
    pairs = [
        (s, v) for s, v in zip(curve.steps, curve.grad_norm or [], strict=False) if v is not None
    ]
    return [s for s, _ in pairs], [v for _, v in pairs]


def _draw_grad_norm(ax: Axes, curve: Curve, handles: list[Artist]) -> Axes | None:
    steps, grads = _logged(curve)
    if not any(math.isfinite(v) for v in grads):
        return None
    grad_ax = ax.twinx()
    (line,) = grad_ax.plot(
        steps, _finite(grads), lw=0.5, alpha=0.45, color=_GRAD_COLOR, label="grad norm"
    )
    handles.append(line)
    if _wants_log(grads):
        grad_ax.set_yscale("log")
    elif min(v for v in grads if math.isfinite(v)) >= 0:
        grad_ax.set_ylim(bottom=0)  # a zero baseline keeps grad-norm noise from looking huge
    grad_ax.set_ylabel("grad norm", color=_GRAD_COLOR)
    # Keep the loss line on top of the grad-norm line, not hidden behind the twin axes.
    ax.set_zorder(grad_ax.get_zorder() + 1)
    ax.patch.set_visible(False)
    return grad_ax


def _peak_value(steps: Sequence[int], values: Sequence[float] | None, step: int) -> float:
    if values is None:
        return math.nan
    i = bisect_left(steps, step)
    return values[i] if i < len(steps) and steps[i] == step else math.nan


def _draw_event(ax: Axes, grad_ax: Axes | None, curve: Curve, event: ReplayEvent) -> None:
    color = ACTION_COLORS.get(event.action, _OTHER_COLOR)
    end = curve.steps[-1] if event.end_step is None else event.end_step
    # A one-step event on a 20k-step axis would be thinner than a pixel: pad it.
    pad = max(0.5, 0.002 * (curve.steps[-1] - curve.steps[0]))
    alpha = 0.1 if event.end_step is None else 0.2  # an open event may cover half the plot
    ax.axvspan(event.onset_step - pad, end + pad, color=color, alpha=alpha, lw=0, zorder=1)
    on_grad = event.metric == "grad_norm" and grad_ax is not None
    target = grad_ax if on_grad and grad_ax is not None else ax
    steps, series = _logged(curve) if on_grad else (curve.steps, curve.loss)
    y = _peak_value(steps, series, event.peak_step)
    if math.isfinite(y):
        target.plot([event.peak_step], [y], marker="v", ms=8, color=color, mec="black", zorder=5)
    else:
        target.plot(
            [event.peak_step], [0.97], marker="v", ms=8, color=color, mec="black", zorder=5,
            transform=target.get_xaxis_transform(),
        )  # fmt: skip


def _title(curve: Curve, report: ReplayReport) -> str:
    counts = Counter(e.action for e in report.events)
    detail = ", ".join(f"{n} {action}" for action, n in sorted(counts.items()))
    events = f"{len(report.events)} event{'s' if len(report.events) != 1 else ''}"
    return f"{os.path.basename(curve.path)}: {report.points} points, {events}" + (
        f" ({detail})" if detail else ""
    )


def plot_report(curve: Curve, report: ReplayReport, path: str) -> None:
    """Save a picture of ``curve`` with ``report``'s events to ``path`` (png, svg or pdf).

    Each event is shaded from onset to end (to the last step while still open) in its
    action's colour, with a triangle on its peak; the grad norm, when logged, is drawn
    against a second y-axis. An axis turns logarithmic when its values span more than
    two decades, so one huge spike does not flatten the rest of the curve.

    Example:
        >>> import pathlib, tempfile
        >>> curve = Curve(path="run.csv", format="csv", steps=[0, 1, 2], loss=[3.0, 9.0, 2.9])
        >>> event = ReplayEvent(kind="spike", metric="loss", onset_step=1, peak_step=1,
        ...                     end_step=1, transient=True, score=12.0, action="watch",
        ...                     detected_step=1)
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     out = pathlib.Path(tmp, "run.png")
        ...     plot_report(curve, ReplayReport(points=3, events=[event]), str(out))
        ...     out.read_bytes()[:8]
        b'\\x89PNG\\r\\n\\x1a\\n'
    """
    fig = Figure(figsize=(12, 5), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    handles: list[Artist] = []
    _draw_loss(ax, curve, handles)
    grad_ax = _draw_grad_norm(ax, curve, handles)
    for event in report.events:
        _draw_event(ax, grad_ax, curve, event)
    for action in sorted({e.action for e in report.events}):
        color = ACTION_COLORS.get(action, _OTHER_COLOR)
        handles.append(Patch(facecolor=color, alpha=0.5, label=f"event: {action}"))
    if not report.events:
        handles.append(Line2D([], [], lw=0, label="no events"))
    ax.set_title(_title(curve, report))
    ax.legend(handles=handles, loc="upper right", fontsize="small", framealpha=0.85)
    fig.savefig(path)
