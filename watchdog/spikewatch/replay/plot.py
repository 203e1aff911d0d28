"""Draw a replayed curve and the events found in it into an image file.

One panel per metric (loss; grad norm on a log scale when it was logged), sharing the
step axis; each event is marked on the panel of its metric (`plot_marks`), and the
legend sits outside the data, to the right. The figure is built on a private `Figure`
with an Agg canvas, so plotting never touches pyplot's global state or the process-wide
matplotlib backend.
"""

from __future__ import annotations

import math
import os
from collections import Counter
from collections.abc import Sequence

from matplotlib.artist import Artist
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from spikewatch.replay import plot_marks
from spikewatch.replay.model import Curve, ReplayEvent, ReplayReport
from spikewatch.replay.plot_marks import ACTION_COLORS, KIND_MARKERS, NAN_COLOR, OTHER_COLOR

__all__ = ["ACTION_COLORS", "plot_report"]

_LOSS_COLOR = "#1f77b4"
_GRAD_COLOR = "#2ca02c"


def _finite(values: Sequence[float]) -> list[float]:
    """``values`` with NaN/inf turned into NaN, which matplotlib draws as a gap."""
    return [v if math.isfinite(v) else math.nan for v in values]


def _wants_log(values: Sequence[float]) -> bool:
    """True when all finite values are positive and span more than two decades."""
    finite = [v for v in values if math.isfinite(v)]
    return bool(finite) and min(finite) > 0 and max(finite) / min(finite) > 100.0


def _logged(curve: Curve) -> tuple[list[int], list[float]]:
    """The steps a grad norm was logged at and its values (a sparse column's gaps dropped,
    so a grad norm logged every 10th step still draws as a line)."""
    pairs = [
        (s, v) for s, v in zip(curve.steps, curve.grad_norm or [], strict=False) if v is not None
    ]
    return [s for s, _ in pairs], [v for _, v in pairs]


def _panel(
    ax: Axes, steps: Sequence[int], values: Sequence[float], *, name: str, color: str, log: bool
) -> list[Artist]:
    """Draw one metric's line, its NaN crosses and its axis; return its legend handles."""
    width = 0.6 if len(steps) > 5000 else 0.9
    (line,) = ax.plot(steps, _finite(values), lw=width, color=color, label=name, zorder=2)
    handles: list[Artist] = [line]
    if log:
        ax.set_yscale("log")
    plot_marks.headroom(ax, values, log=log)
    bad = plot_marks.draw_nonfinite(ax, steps, values)
    if bad:
        handles.append(
            Line2D([], [], marker="X", lw=0, ms=8, color=NAN_COLOR, label=f"{name} NaN/inf ({bad})")
        )
    ax.set_ylabel(name + (" (log)" if log else ""), color=color)
    ax.grid(alpha=0.25, lw=0.5)
    return handles


def _mark_events(ax: Axes, curve: Curve, events: Sequence[ReplayEvent], metric: str) -> None:
    """Bands and markers of ``events`` on the panel of ``metric``."""
    steps, values = _logged(curve) if metric == "grad_norm" else (curve.steps, curve.loss)
    words = plot_marks.labelled(events)
    for event in events:
        plot_marks.draw_band(ax, event, curve.steps[0], curve.steps[-1])
    for i, event in enumerate(events):
        y = plot_marks.value_at(steps, values, event.peak_step)
        plot_marks.draw_marker(ax, event, y, label=i in words)


def _event_handles(events: Sequence[ReplayEvent]) -> list[Artist]:
    """Legend entries: one colour per action taken, one shape per kind found."""
    handles: list[Artist] = []
    for action in sorted({e.action for e in events}):
        color = ACTION_COLORS.get(action, OTHER_COLOR)
        handles.append(Patch(facecolor=color, alpha=0.6, label=f"action: {action}"))
    for kind in sorted({e.kind for e in events}):
        handles.append(
            Line2D(
                [],
                [],
                marker=KIND_MARKERS.get(kind, "o"),
                lw=0,
                ms=8,
                color="white",
                mec="black",
                label=f"kind: {kind}",
            )
        )
    if not events:
        handles.append(Line2D([], [], lw=0, label="no events"))
    return handles


def _title(curve: Curve, report: ReplayReport) -> str:
    counts = Counter(e.action for e in report.events)
    detail = ", ".join(f"{n} {action}" for action, n in sorted(counts.items()))
    events = f"{len(report.events)} event{'s' if len(report.events) != 1 else ''}"
    return f"{os.path.basename(curve.path)}: {report.points} points, {events}" + (
        f" ({detail})" if detail else ""
    )


def build_figure(curve: Curve, report: ReplayReport, *, width: float = 12.0) -> Figure:
    """The replay chart as a `Figure` (``plot_report`` saves it)."""
    steps, grads = _logged(curve)
    has_grad = any(math.isfinite(v) for v in grads)
    fig = Figure(
        figsize=(width, width * (0.5 if has_grad else 0.36)), dpi=100, layout="constrained"
    )
    FigureCanvasAgg(fig)
    axes = fig.subplots(
        2 if has_grad else 1,
        1,
        sharex=True,
        squeeze=False,
        height_ratios=[3, 2] if has_grad else [1],
    )[:, 0]
    handles = _panel(
        axes[0], curve.steps, curve.loss, name="loss", color=_LOSS_COLOR, log=_wants_log(curve.loss)
    )
    panels = {"loss": axes[0]}
    if has_grad:
        positive = min(v for v in grads if math.isfinite(v)) > 0
        handles += _panel(axes[1], steps, grads, name="grad norm", color=_GRAD_COLOR, log=positive)
        panels["grad_norm"] = axes[1]
    for metric, ax in panels.items():
        # An event on a metric without a panel (none today) goes on the loss panel.
        mine = [e for e in report.events if (e.metric if e.metric in panels else "loss") == metric]
        _mark_events(ax, curve, mine, metric)
        ax.margins(x=0.01)
    axes[-1].set_xlabel("step")
    axes[0].set_title(_title(curve, report))
    handles += _event_handles(report.events)
    fig.legend(handles=handles, loc="outside right upper", fontsize="small", frameon=False)
    return fig


def plot_report(curve: Curve, report: ReplayReport, path: str) -> None:
    """Save a picture of ``curve`` with ``report``'s events to ``path`` (png, svg or pdf).

    Each event is shaded from onset to end (to the last step while still open) in its
    action's colour, with a marker of its kind on its peak, on the panel of its metric.

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
    build_figure(curve, report).savefig(path)
