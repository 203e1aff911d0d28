"""Run the demo's three trainings and summarise them (the `spikewatch demo` command's body)."""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO

import torch

from spikewatch.replay.command import ProgressBar
from spikewatch_hooks.demo.chart import plot_runs
from spikewatch_hooks.demo.scenario import DemoSettings, RunResult, load_corpus, train


def run_demo(
    s: DemoSettings, *, plot: str | None, progress: TextIO | None = sys.stderr, threads: int = 2
) -> dict[str, Any]:
    """Train clean, unguarded and guarded; return the summary ``--json`` prints."""
    torch.set_num_threads(threads)
    corpus = load_corpus()
    started = time.perf_counter()
    runs: list[RunResult] = []
    for kind in ("clean", "unguarded", "guarded"):
        # A redrawn bar on a terminal; one line per finished run in a log.
        live = progress is not None and progress.isatty()
        bar = ProgressBar(progress, label=f"{kind:>9}") if live and progress else None
        t0 = time.perf_counter()
        runs.append(train(kind, s, corpus, bar))
        if bar is not None:
            bar.close()
        elif progress is not None:
            progress.write(
                f"{kind}: {s.steps} steps in {time.perf_counter() - t0:.0f} s, "
                f"held-out loss {runs[-1].final_loss:.3f}\n"
            )
            progress.flush()
    if plot:
        plot_runs(runs, s, plot)
    clean, unguarded, guarded = runs
    return {
        "clean_final_loss": round(clean.final_loss, 4),
        "unguarded_final_loss": round(unguarded.final_loss, 4),
        "guarded_final_loss": round(guarded.final_loss, 4),
        "rollbacks": guarded.stats.get("rollbacks", 0),
        "skipped_batches": guarded.stats.get("skipped_batches", 0),
        "skipped_steps": guarded.stats.get("skipped_steps", 0),
        "onset_step": guarded.onset_step,
        "detected_step": guarded.detected_step,
        "rollback_step": guarded.rollback_step,
        "poisoned_batches": [s.poison_start, s.poison_start + s.poison_batches],
        "steps": s.steps,
        "seconds": round(time.perf_counter() - started, 1),
        "plot": plot,
    }


def format_summary(r: dict[str, Any]) -> str:
    """The human-readable summary."""
    clean = r["clean_final_loss"]
    lines = [
        f"spikewatch demo: {r['steps']} steps of a tiny GPT on standard-library docstrings; "
        f"bad batches at data positions {r['poisoned_batches'][0]}-{r['poisoned_batches'][1] - 1}",
        f"{'run':<10} {'held-out loss':>13} {'vs clean':>9}",
    ]
    for kind in ("clean", "unguarded", "guarded"):
        loss = r[f"{kind}_final_loss"]
        delta = "-" if kind == "clean" else f"{100 * (loss - clean) / clean:+.1f}%"
        lines.append(f"{kind:<10} {loss:>13.4f} {delta:>9}")
    if r["rollbacks"]:
        lines.append(
            f"guard: spike at step {r['detected_step']} (onset {r['onset_step']}), rolled back "
            f"at step {r['rollback_step']}, {r['rollbacks']} rollback(s), "
            f"{r['skipped_batches']} batches skipped, {r['skipped_steps']} updates skipped"
        )
    else:
        lines.append("guard: no rollback happened")
    lines.append(f"took {r['seconds']} s" + (f"; chart: {r['plot']}" if r["plot"] else ""))
    return "\n".join(lines)
