"""The demo and replay charts, read back as pixels: what a reader must see is where it belongs.

Charts are built from synthetic data (no training), rendered small, and read back with
`matplotlib.image.imread`:
the image size, the colour of a marked region at its data coordinates, the legend
outside every data area.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from matplotlib.axes import Axes
from matplotlib.colors import to_rgb
from matplotlib.figure import Figure
from matplotlib.image import imread

pytest.importorskip("torch")

from spikewatch.replay.model import Curve, ReplayEvent, ReplayReport
from spikewatch.replay.plot import build_figure as replay_figure
from spikewatch.replay.plot_marks import ACTION_COLORS, NAN_COLOR
from spikewatch_hooks.demo.chart import COLORS
from spikewatch_hooks.demo.chart import build_figure as demo_figure
from spikewatch_hooks.demo.chart_story import guard_story, shared_prefix
from spikewatch_hooks.demo.scenario import DemoSettings, RunResult

Pixels = list[list[tuple[int, int, int]]]


def _render(fig: Figure, path: Path) -> tuple[tuple[int, int], Pixels]:
    """Save ``fig`` as PNG and read it back: ((width, height), RGB rows, top row first)."""
    fig.savefig(path)
    image = imread(path)
    rows = [
        [(round(255 * p[0]), round(255 * p[1]), round(255 * p[2])) for p in row] for row in image
    ]
    return (len(rows[0]), len(rows)), rows


def _pixel_of(fig: Figure, ax: Axes, x: float, y: float) -> tuple[int, int]:
    """Image column and row of data point (x, y) on ``ax`` (the image's origin is top-left)."""
    px, py = ax.transData.transform((x, y))
    return round(px), round(fig.bbox.height - py)


def _near(
    pixels: Pixels,
    at: tuple[int, int],
    color: str,
    *,
    radius: int = 3,
    alpha: float = 1.0,
    tolerance: int = 40,
) -> bool:
    """True when a pixel within ``radius`` of ``at`` has ``color`` (blended over white)."""
    want = [round(255 * (alpha * c + (1 - alpha))) for c in to_rgb(color)]
    col, row = at
    for r in range(row - radius, row + radius + 1):
        for c in range(col - radius, col + radius + 1):
            got = pixels[r][c]
            if all(abs(g - w) <= tolerance for g, w in zip(got, want, strict=True)):
                return True
    return False


def _legend_outside(fig: Figure) -> None:
    fig.canvas.draw()
    (legend,) = fig.legends
    box = legend.get_window_extent()
    for ax in fig.axes:
        assert not box.overlaps(ax.get_window_extent()), "the legend covers a data area"


def _demo_runs() -> tuple[list[RunResult], DemoSettings]:
    """Three 200-step runs shaped like the demo's: bad data at 160-179, rollback 170 -> 150."""
    s = DemoSettings(steps=200, poison_start=160, poison_batches=20)
    base = [2.0 + 2.0 * math.exp(-i / 30) + 0.01 * (i % 3) for i in range(200)]
    bad = [base[i] + (2.5 if 160 <= i < 180 else 0.8 if i >= 180 else 0.0) for i in range(200)]
    clean = RunResult(kind="clean", final_loss=2.1, steps=list(range(200)), losses=base)
    unguarded = RunResult(kind="unguarded", final_loss=3.0, steps=list(range(200)), losses=bad)
    steps = list(range(171)) + list(range(150, 200))
    losses = bad[:171] + [base[i] - 0.005 for i in range(150, 200)]
    guarded = RunResult(
        kind="guarded",
        final_loss=2.1,
        steps=steps,
        losses=losses,
        stats={"rollbacks": 1, "skipped_batches": 40},
        rollback_step=170,
    )
    return [clean, unguarded, guarded], s


def test_demo_story_from_plain_run_data() -> None:
    runs, _ = _demo_runs()
    prefix = shared_prefix(runs)
    story = guard_story(runs[2], runs[0], prefix, bad_end=180)
    assert prefix == 160
    assert story is not None
    assert (story.rollback_step, story.restore_step, story.skipped) == (170, 150, (150, 190))
    assert story.abandoned[0][0] == 159 and story.abandoned[0][-1] == 170
    assert story.recovery_step == 180  # the first step past the bad data, on the clean curve


def test_demo_chart_pixels(tmp_path: Path) -> None:
    runs, s = _demo_runs()
    fig = demo_figure(runs, s, width=8.0)
    _legend_outside(fig)
    whole, close = fig.axes
    story = guard_story(runs[2], runs[0], 160, bad_end=180)
    assert story is not None
    low = close.get_ylim()[0]
    skip_at = _pixel_of(fig, close, 185, low)
    spike_at = _pixel_of(fig, close, *[v[-4] for v in story.abandoned])
    bad_at = _pixel_of(fig, close, 162, sum(close.get_ylim()) / 2)
    size, pixels = _render(fig, tmp_path / "demo.png")
    assert size == (800, 400)
    # The skipped data: its bar under the curves, at data positions the guard never used.
    assert _near(pixels, (skip_at[0], skip_at[1] - 5), COLORS["skipped"], alpha=0.9)
    # The guarded run's own spike is drawn on top of the unguarded one (green, not red).
    assert _near(pixels, spike_at, COLORS["guarded"], radius=2)
    assert not _near(pixels, spike_at, COLORS["skipped"], radius=2)  # the check can fail
    # The bad-batch band lies where the bad data is, away from the lines.
    assert _near(pixels, bad_at, COLORS["bad"], alpha=0.35, radius=1, tolerance=12)
    # The shared prefix is one neutral line, with its own legend entry.
    assert whole.get_lines()[0].get_color() == COLORS["shared"]
    assert "all three runs" in str(whole.get_lines()[0].get_label())


def _replay_data() -> tuple[Curve, ReplayReport]:
    steps = list(range(300))
    loss = [3.0 + 0.01 * (i % 5) for i in steps]
    loss[150] = math.nan
    grads: list[float | None] = [0.4 + 0.01 * (i % 7) for i in steps]
    grads[200] = 15.0
    curve = Curve(path="run.csv", format="csv", steps=steps, loss=loss, grad_norm=grads)
    events = [
        ReplayEvent(
            kind="nonfinite",
            metric="loss",
            onset_step=150,
            peak_step=150,
            end_step=150,
            transient=True,
            score=0.0,
            action="skip_step",
            detected_step=150,
        ),
        ReplayEvent(
            kind="spike",
            metric="grad_norm",
            onset_step=200,
            peak_step=200,
            end_step=200,
            transient=True,
            score=596.0,
            action="skip_step",
            detected_step=200,
        ),
    ]
    return curve, ReplayReport(points=300, events=events)


def test_replay_chart_pixels(tmp_path: Path) -> None:
    curve, report = _replay_data()
    fig = replay_figure(curve, report, width=8.0)
    _legend_outside(fig)
    loss_ax, grad_ax = fig.axes
    assert (loss_ax.get_yscale(), grad_ax.get_yscale()) == ("linear", "log")
    # The largest event's marker lies inside its panel's limits, on the grad-norm panel.
    assert grad_ax.get_ylim()[0] < 15.0 < grad_ax.get_ylim()[1] / 2
    _, nan_py = loss_ax.transAxes.transform((0, 0.93))
    nan_at = (round(loss_ax.transData.transform((150, 0))[0]), round(fig.bbox.height - nan_py))
    spike_at = _pixel_of(fig, grad_ax, 200, 15.0)
    size, pixels = _render(fig, tmp_path / "replay.png")
    assert size == (800, 400)
    assert _near(pixels, nan_at, NAN_COLOR, radius=2)
    assert _near(pixels, spike_at, ACTION_COLORS["skip_step"], radius=2)
    assert not _near(pixels, spike_at, NAN_COLOR, radius=2)  # the check can fail
    labels = [str(t.get_text()) for t in [*loss_ax.texts, *grad_ax.texts]]
    assert "NaN @ 150" in labels and "spike 596 → skip_step" in labels


def test_demo_chart_without_a_rollback(tmp_path: Path) -> None:
    runs, s = _demo_runs()
    runs[2] = RunResult(kind="guarded", final_loss=3.0, steps=runs[1].steps, losses=runs[1].losses)
    fig = demo_figure(runs, s, width=6.0)
    _legend_outside(fig)
    labels = [str(line.get_label()) for line in fig.axes[1].get_lines()]
    assert "guarded (held-out loss 3.000)" in labels
    assert not fig.axes[1].texts  # nothing to annotate: no rollback happened
    assert _render(fig, tmp_path / "demo.png")[0] == (600, 300)


def test_replay_chart_of_a_loss_only_curve(tmp_path: Path) -> None:
    curve, report = _replay_data()
    curve.grad_norm = None
    fig = replay_figure(curve, report, width=6.0)
    _legend_outside(fig)
    (loss_ax,) = fig.axes  # one panel: the grad-norm event goes on the loss panel
    assert len(loss_ax.texts) == 3  # the NaN label and both events' labels
    assert _render(fig, tmp_path / "replay.png")[0] == (600, 216)
