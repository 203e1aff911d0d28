"""Draw an incident's window of loss values into PNG bytes for Slack.

Like `spikewatch.replay.plot`, the figure lives on a private `Figure` with an Agg
canvas: the sink draws on its worker thread, and pyplot's global state is neither
thread-safe nor ours to change.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from spikewatch.replay.plot import ACTION_COLORS

_LOSS_COLOR = "#1f77b4"
_ONSET_COLOR = ACTION_COLORS["watch"]
_DETECTED_COLOR = ACTION_COLORS["rollback"]


def _gaps(values: Sequence[float]) -> list[float]:
    """NaN for every non-finite value, which matplotlib draws as a gap in the line."""
    return [v if math.isfinite(v) else math.nan for v in values]


def _wants_log(values: Sequence[float]) -> bool:
    """True when all finite values are positive and span more than two decades."""
    finite = [v for v in values if math.isfinite(v)]
    return bool(finite) and min(finite) > 0 and max(finite) / min(finite) > 100.0


def render_incident_chart(
    window: Sequence[tuple[int, float]],
    *,
    onset_step: int,
    detected_step: int,
    title: str,
    metric: str = "loss",
) -> bytes:
    """Return a PNG of ``window`` (step, ``metric`` value) with onset and detection marked.

    Non-finite values leave a gap in the line and get a cross along the top edge; the
    y-axis turns logarithmic when the values span more than two decades, so the
    spike does not flatten the baseline.

    Example:
        >>> png = render_incident_chart([(0, 2.0), (1, 9.0), (2, float("nan")), (3, 2.1)],
        ...                             onset_step=1, detected_step=1, title="run-1: spike")
        >>> png[:8]
        b'\\x89PNG\\r\\n\\x1a\\n'
    """
    fig = Figure(figsize=(8, 3.2), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    steps = [s for s, _ in window]
    values = [v for _, v in window]
    ax.plot(steps, _gaps(values), lw=1.0, color=_LOSS_COLOR, label=metric)
    bad = [s for s, v in window if not math.isfinite(v)]
    if bad:
        ax.scatter(
            bad, [0.97] * len(bad), marker="x", s=30, color=_DETECTED_COLOR, zorder=4,
            transform=ax.get_xaxis_transform(), label=f"NaN/inf ({len(bad)})",
        )  # fmt: skip
    if detected_step > onset_step:
        ax.axvspan(onset_step, detected_step, color=_ONSET_COLOR, alpha=0.15, lw=0)
    ax.axvline(onset_step, color=_ONSET_COLOR, lw=1.2, ls="--", label=f"onset ({onset_step})")
    ax.axvline(detected_step, color=_DETECTED_COLOR, lw=1.2, label=f"detected ({detected_step})")
    if _wants_log(values):
        ax.set_yscale("log")
    if not window:
        ax.text(0.5, 0.5, "no values in the window", ha="center", transform=ax.transAxes)
    ax.set_xlabel("step")
    ax.set_ylabel(metric)
    ax.set_title(title)
    ax.margins(x=0.01)
    ax.legend(loc="upper left", fontsize="small", framealpha=0.85)
    out = io.BytesIO()
    fig.savefig(out, format="png")
    return out.getvalue()
