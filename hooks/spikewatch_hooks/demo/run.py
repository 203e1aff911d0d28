"""Run the demo's three trainings and summarise them (the `spikewatch demo` command's body)."""

from __future__ import annotations

import os
import sys
import time
from typing import Any, TextIO

import torch

from spikewatch.replay.command import ProgressBar
from spikewatch_hooks.demo.chart import plot_runs
from spikewatch_hooks.demo.corpus import CharCorpus
from spikewatch_hooks.demo.scenario import DemoSettings, Kind, RunResult, load_corpus, train


def default_threads(cores: int | None = None) -> int:
    """Torch threads for this host: 1 on up to 2 cores, else half of them (at most 4).

    The model is tiny: on a 2-core host a second thread buys little when the machine is
    quiet, and when it is busy two spinning threads fight the other jobs for both cores
    (measured: 100 s quiet, 2,330 s busy with 2 threads, against ~55 s per run with 1).

    Example:
        >>> default_threads(2), default_threads(8), default_threads(64)
        (1, 4, 4)
    """
    n = cores if cores is not None else (os.cpu_count() or 1)
    return 1 if n <= 2 else min(4, n // 2)


class LineProgress:
    """Progress for a log (stderr not a terminal): one line every ``every_s`` seconds.

    Example:
        >>> import io
        >>> out = io.StringIO()
        >>> line = LineProgress(out, label="clean", every_s=0.0)
        >>> line(30, 600)
        >>> out.getvalue()
        'clean: step 30/600 (5%)\\n'
    """

    def __init__(self, stream: TextIO, *, label: str, every_s: float = 10.0) -> None:
        self.stream = stream
        self.label = label
        self.every_s = every_s
        self._last = time.monotonic()

    def __call__(self, done: int, total: int) -> None:
        now = time.monotonic()
        if now - self._last < self.every_s and done < total:
            return
        if done < total:  # the finished line is written by the caller, with the loss
            self.stream.write(f"{self.label}: step {done}/{total} ({100 * done // total}%)\n")
            self.stream.flush()
        self._last = now


def run_demo(
    s: DemoSettings, *, plot: str | None, progress: TextIO | None = sys.stderr, threads: int = 0
) -> dict[str, Any]:
    """Train clean, unguarded and guarded; return the summary ``--json`` prints.

    ``threads`` 0 picks `default_threads` for this host.
    """
    threads = threads or default_threads()
    torch.set_num_threads(threads)
    corpus = load_corpus()
    started = time.perf_counter()
    runs: list[RunResult] = []
    for kind in ("clean", "unguarded", "guarded"):
        runs.append(_one_run(kind, s, corpus, progress, threads))
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
        "verdict": guarded.stats.get("last_verdict"),
        "poisoned_batches": [s.poison_start, s.poison_start + s.poison_batches],
        "steps": s.steps,
        "threads": threads,
        "seconds": round(time.perf_counter() - started, 1),
        "plot": plot,
    }


def _one_run(
    kind: Kind, s: DemoSettings, corpus: CharCorpus, progress: TextIO | None, threads: int
) -> RunResult:
    """Train one run with its progress: a redrawn bar on a terminal, lines in a log."""
    bar: ProgressBar | LineProgress | None = None
    if progress is not None:
        live = progress.isatty()
        bar = (
            ProgressBar(progress, label=f"{kind:>9}")
            if live
            else LineProgress(progress, label=kind)
        )
    t0 = time.perf_counter()
    result = train(kind, s, corpus, bar)
    if isinstance(bar, ProgressBar):
        bar.close()
    if progress is not None:
        progress.write(
            f"{kind}: {s.steps} steps in {time.perf_counter() - t0:.0f} s ({threads} torch "
            f"thread{'s' if threads > 1 else ''}), held-out loss {result.final_loss:.3f}\n"
        )
        progress.flush()
    return result


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
    verdict = r.get("verdict")
    if verdict:  # after the rollback, from the restored state: data or state?
        lines.append(f"forensics: {verdict['why']}\n  -> {verdict['action']}")
    threads = f" ({r['threads']} torch thread{'s' if r['threads'] > 1 else ''})"
    lines.append(f"took {r['seconds']} s{threads}" + (f"; chart: {r['plot']}" if r["plot"] else ""))
    return "\n".join(lines)
