"""The demo's chart: the three runs' training loss, the poisoned range and the rollback."""

from __future__ import annotations

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from spikewatch_hooks.demo.scenario import DemoSettings, RunResult

COLORS = {"clean": "#2b7bba", "unguarded": "#d7301f", "guarded": "#1a9850"}


def plot_runs(runs: list[RunResult], s: DemoSettings, path: str) -> None:
    """Write a PNG (or SVG/PDF, by suffix) of the runs to ``path``."""
    fig = Figure(figsize=(11, 5), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for run in runs:
        for i, (steps, losses) in enumerate(_branches(run)):
            abandoned = i < len(_branches(run)) - 1
            label = None if i else f"{run.kind} (held-out {run.final_loss:.3f})"
            ax.plot(
                steps,
                losses,
                color=COLORS[run.kind],
                lw=0.8,
                alpha=0.35 if abandoned else 0.9,
                label=label,
            )
    ax.axvspan(
        s.poison_start,
        s.poison_start + s.poison_batches,
        color="#fdae61",
        alpha=0.25,
        label="bad batches (unguarded runs)",
    )
    guarded = next((r for r in runs if r.kind == "guarded"), None)
    if guarded is not None and guarded.rollback_step is not None:
        ax.axvline(
            guarded.rollback_step,
            color=COLORS["guarded"],
            ls="--",
            lw=1,
            label=f"rollback at step {guarded.rollback_step}",
        )
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss")
    ax.set_ylim(top=min(ax.get_ylim()[1], 8.0))
    ax.set_title("spikewatch demo: poisoned batches, with and without the guard")
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)


def _branches(run: RunResult) -> list[tuple[list[int], list[float]]]:
    """Split a run where its step counter went back (a rollback): old branch, new branch."""
    out: list[tuple[list[int], list[float]]] = [([], [])]
    for step, loss in zip(run.steps, run.losses, strict=True):
        if out[-1][0] and step <= out[-1][0][-1]:
            out.append(([], []))
        out[-1][0].append(step)
        out[-1][1].append(loss)
    return out
