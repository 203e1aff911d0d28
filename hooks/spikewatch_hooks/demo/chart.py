"""The demo's chart: the shared start, the bad batches, the guard's rollback and recovery.

Two panels on one loss axis: the whole run on the left, and on the right a close-up of
the bad data and what the guard did about it (its own spike, the rollback from → to,
the data range it skipped, the step it was back on the clean curve). The legend sits
below the panels, outside the data. Everything is computed from plain run data
(`chart_story`), so the chart is drawn and tested without training.
"""

from __future__ import annotations

from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from spikewatch_hooks.demo.chart_story import GuardStory, guard_story, shared_prefix, smooth
from spikewatch_hooks.demo.scenario import DemoSettings, RunResult

COLORS = {
    "shared": "#525252",
    "clean": "#2b7bba",
    "unguarded": "#d7301f",
    "guarded": "#1a9850",
    "bad": "#fdae61",
    "skipped": "#9e9ac8",
}
_ZOOM_BEFORE = 60  # steps of context before the first bad batch in the close-up
_SKIP_BAR = 0.07  # height of the skipped-data bar (axes fraction), under the curves


def _lines(ax: Axes, runs: dict[str, RunResult], prefix: int, story: GuardStory | None) -> None:
    """The curves (smoothed): the shared prefix once, then one line per run."""
    first = runs["clean"]
    ax.plot(
        first.steps[:prefix],
        smooth(first.losses)[:prefix],
        color=COLORS["shared"],
        lw=1.6,
        label="all three runs (identical until the bad data)",
    )
    for kind in ("clean", "unguarded"):
        run = runs[kind]
        start = max(prefix - 1, 0)
        ax.plot(
            run.steps[start:],
            smooth(run.losses)[start:],
            color=COLORS[kind],
            lw=1.6,
            label=f"{kind} (held-out loss {run.final_loss:.3f})",
            zorder=3,
        )
    guarded = runs["guarded"]
    if story is None:
        ax.plot(
            guarded.steps,
            smooth(guarded.losses),
            color=COLORS["guarded"],
            lw=2.0,
            zorder=4,
            label=f"guarded (held-out loss {guarded.final_loss:.3f})",
        )
        return
    # The guarded run's own spike, on top of the unguarded one it matches step for step.
    ax.plot(
        *story.abandoned,
        color=COLORS["guarded"],
        lw=2.0,
        ls=(0, (2, 1)),
        zorder=5,
        label="guarded: its spike, then undone",
    )
    ax.plot(
        *story.kept,
        color=COLORS["guarded"],
        lw=2.2,
        zorder=5,
        label=f"guarded after the rollback (held-out {guarded.final_loss:.3f})",
    )


def _bands(ax: Axes, s: DemoSettings, story: GuardStory | None) -> None:
    """The bad batches (every poisoned run meets them) and the data the guard skipped."""
    stop = s.poison_start + s.poison_batches
    ax.axvspan(
        s.poison_start,
        stop,
        color=COLORS["bad"],
        alpha=0.35,
        lw=0,
        zorder=0,
        label=f"bad batches: data {s.poison_start}-{stop - 1} (both poisoned runs)",
    )
    if story is not None:
        a, b = story.skipped
        ax.axvspan(
            a,
            b,
            ymin=0.0,
            ymax=_SKIP_BAR,
            color=COLORS["skipped"],
            alpha=0.9,
            lw=0,
            zorder=1,
            label=f"data the guard skipped: {a}-{b - 1}",
        )


def _annotate(ax: Axes, story: GuardStory) -> None:
    """Label the guard's actions in the close-up: the rollback (from → to), the skip, recovery."""
    kept = dict(zip(*story.kept, strict=True))
    peak = story.abandoned[1][-1]
    ax.annotate(
        "",
        xy=(story.restore_step, kept[story.restore_step]),
        xytext=(story.rollback_step, peak),
        arrowprops={
            "arrowstyle": "-|>",
            "color": COLORS["guarded"],
            "lw": 1.8,
            "mutation_scale": 16,
            "connectionstyle": "arc3,rad=0.45",
            "shrinkA": 2,
            "shrinkB": 2,
        },
        zorder=7,
    )
    ax.text(
        story.rollback_step + 3,
        peak,
        f"rollback at step {story.rollback_step}\n→ back to step {story.restore_step}",
        ha="left",
        va="top",
        fontsize=9,
        color=COLORS["guarded"],
        fontweight="bold",
        zorder=7,
    )
    a, b = story.skipped
    ax.text(
        (a + b) / 2,
        _SKIP_BAR / 2,
        f"guarded run skips data {a}-{b - 1}",
        ha="center",
        va="center",
        fontsize=8,
        color="white",
        fontweight="bold",
        zorder=7,
        transform=ax.get_xaxis_transform(),
    )
    if story.recovery_step is not None:
        y = kept[story.recovery_step]
        ax.plot(
            [story.recovery_step],
            [y],
            marker="o",
            ms=9,
            mfc="white",
            mec=COLORS["guarded"],
            mew=2,
            zorder=7,
        )
        ax.annotate(
            f"past the bad data, on the clean curve (step {story.recovery_step})",
            xy=(story.recovery_step, y),
            xytext=(-20, 40),
            textcoords="offset points",
            ha="left",
            va="bottom",
            fontsize=8,
            color=COLORS["guarded"],
            zorder=7,
            arrowprops={"arrowstyle": "-", "color": COLORS["guarded"]},
        )


def _limits(ax: Axes, runs: list[RunResult]) -> None:
    """Room under the curves for the skipped-data bar; the spike's top kept in view."""
    values = [v for r in runs for v in smooth(r.losses)]
    low, high = min(values), min(max(values), 8.0)
    span = high - low
    ax.set_ylim(low - span * (_SKIP_BAR + 0.04) / (1 - _SKIP_BAR - 0.04), high + 0.05 * span)


def build_figure(runs: list[RunResult], s: DemoSettings, *, width: float = 11.0) -> Figure:
    """The demo chart as a `Figure` (``plot_runs`` saves it)."""
    by_kind: dict[str, RunResult] = {r.kind: r for r in runs}
    prefix = shared_prefix(runs)
    bad_end = s.poison_start + s.poison_batches
    story = guard_story(by_kind["guarded"], by_kind["clean"], prefix, bad_end=bad_end)
    fig = Figure(figsize=(width, width * 0.5), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    whole, close = fig.subplots(1, 2, sharey=True, width_ratios=[1, 2])
    for ax in (whole, close):
        _bands(ax, s, story)
        _lines(ax, by_kind, prefix, story)
        ax.grid(alpha=0.25, lw=0.5)
        ax.set_xlabel("optimizer step")
    close.set_xlim(s.poison_start - _ZOOM_BEFORE, s.steps)
    whole.set_xlim(0, s.steps)
    whole.set_ylabel("training loss (8-step mean)")
    whole.set_title("the whole run", fontsize=10)
    close.set_title("close-up: the bad data and the guard", fontsize=10)
    if story is not None:
        _annotate(close, story)
    _limits(whole, runs)
    handles, labels = close.get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=3, fontsize=8, frameon=False)
    fig.suptitle("spikewatch demo: 60 bad batches, without and with the guard")
    return fig


def plot_runs(runs: list[RunResult], s: DemoSettings, path: str) -> None:
    """Write a PNG (or SVG/PDF, by suffix) of the runs to ``path``."""
    build_figure(runs, s).savefig(path)
