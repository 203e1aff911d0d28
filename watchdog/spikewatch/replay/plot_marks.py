"""The marks a replay chart puts on a metric's panel: event bands, peak markers, NaN marks.

Every mark is drawn above the curves and inside the axes limits (never clipped at an
edge), and says what it is: its shape is the event's kind, its colour the action taken,
and a short label names the kind and score. A non-finite value has no height, so it is
marked along the top edge of its panel with a labelled cross.
"""

from __future__ import annotations

import math
from bisect import bisect_left
from collections.abc import Sequence

from matplotlib.axes import Axes
from matplotlib.transforms import Transform

from spikewatch.replay.model import ReplayEvent

#: Event colours by policy action: hotter means a stronger intervention.
ACTION_COLORS = {
    "watch": "#e6a100",
    "skip_step": "#8e44ad",
    "rollback": "#d62728",
    "halt": "#111111",
}
OTHER_COLOR = "#7f7f7f"
#: Colour of the cross that marks a NaN/inf value (no action uses it).
NAN_COLOR = "#e7298a"
#: Marker shape by event kind.
KIND_MARKERS = {
    "spike": "v",
    "level_shift": "s",
    "nonfinite": "X",
    "divergence": "^",
    "unresolved": "o",
}
#: Height (axes fraction) of NaN crosses and of the markers of events without a value.
NAN_Y = 0.93
NO_VALUE_Y = 0.80
#: Events labelled in words per panel (the highest scores); the rest get a marker only.
MAX_LABELS = 12
_ON_TOP = 6  # above lines (2) and bands (1)


def value_at(steps: Sequence[int], values: Sequence[float | None], step: int) -> float:
    """The value logged at ``step`` (NaN when not logged there or not finite)."""
    i = bisect_left(steps, step)
    if i < len(steps) and steps[i] == step:
        v = values[i]
        if v is not None and math.isfinite(v):
            return v
    return math.nan


def draw_nonfinite(ax: Axes, steps: Sequence[int], values: Sequence[float | None]) -> int:
    """Mark the steps whose value is NaN/inf with a labelled cross at the top; return how many."""
    bad = [s for s, v in zip(steps, values, strict=True) if v is not None and not math.isfinite(v)]
    if not bad:
        return 0
    ax.scatter(
        bad,
        [NAN_Y] * len(bad),
        marker="X",
        s=70,
        color=NAN_COLOR,
        edgecolors="white",
        linewidths=0.8,
        zorder=_ON_TOP + 1,
        transform=ax.get_xaxis_transform(),
        clip_on=False,
    )
    for step in bad[:MAX_LABELS]:
        ax.annotate(
            f"NaN @ {step}",
            (step, NAN_Y),
            xycoords=ax.get_xaxis_transform(),
            xytext=(7, 0),
            textcoords="offset points",
            va="center",
            fontsize=8,
            color=NAN_COLOR,
            fontweight="bold",
            zorder=_ON_TOP + 1,
        )
    return len(bad)


def draw_band(ax: Axes, event: ReplayEvent, first: int, last: int) -> None:
    """Shade the event from onset to end (to the last step while it is still open)."""
    color = ACTION_COLORS.get(event.action, OTHER_COLOR)
    end = last if event.end_step is None else event.end_step
    # A one-step event on a 20k-step axis would be thinner than a pixel: pad it.
    pad = max(0.5, 0.002 * (last - first))
    alpha = 0.08 if event.end_step is None else 0.18  # an open event may cover half the plot
    ax.axvspan(event.onset_step - pad, end + pad, color=color, alpha=alpha, lw=0, zorder=1)


def draw_marker(ax: Axes, event: ReplayEvent, y: float, *, label: bool) -> None:
    """The event's marker on its peak (``y`` NaN: near the top edge), with its label."""
    color = ACTION_COLORS.get(event.action, OTHER_COLOR)
    marker = KIND_MARKERS.get(event.kind, "o")
    coords: str | Transform = "data"
    if math.isfinite(y):
        xy = (event.peak_step, y)
        ax.plot(*xy, marker=marker, ms=9, color=color, mec="black", mew=0.8, zorder=_ON_TOP)
    else:
        xy, coords = (event.peak_step, NO_VALUE_Y), ax.get_xaxis_transform()
        ax.plot(
            *xy,
            marker=marker,
            ms=9,
            color=color,
            mec="black",
            mew=0.8,
            zorder=_ON_TOP,
            transform=coords,
        )
    if label:
        ax.annotate(
            _words(event),
            xy,
            xycoords=coords,
            xytext=(7, 6),
            textcoords="offset points",
            fontsize=7.5,
            color="black",
            zorder=_ON_TOP,
            bbox={"boxstyle": "round,pad=0.15", "fc": "white", "ec": color, "alpha": 0.85},
        )


def _words(event: ReplayEvent) -> str:
    """``spike 596 → skip_step``: the kind, its score when it has one, a non-watch action."""
    text = event.kind + (f" {event.score:.0f}" if event.score >= 0.5 else "")
    return text + ("" if event.action == "watch" else f" → {event.action}")


def labelled(events: Sequence[ReplayEvent]) -> set[int]:
    """Indices of the events that get a word label: the ``MAX_LABELS`` highest scores."""
    ranked = sorted(range(len(events)), key=lambda i: -events[i].score)
    return set(ranked[:MAX_LABELS])


def headroom(ax: Axes, values: Sequence[float], *, log: bool) -> None:
    """Set the y-limits so the highest marker and its label stay inside the axes."""
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return
    low, high = min(finite), max(finite)
    if log:
        ax.set_ylim(low / 1.5, high * 6.0)
    else:
        span = (high - low) or abs(high) or 1.0
        ax.set_ylim(low - 0.05 * span, high + 0.3 * span)
