"""Forensics: what the probe costs, and what it says on bad data and on a bad state.

Run ``python bench/forensics.py [--threads N]``. Each scenario of
`spikewatch_hooks.demo.forensics_runs` (`TinyGPT` on CPU, 500 steps) is trained
clean, unguarded, guarded without the probe and guarded with it:

- ``random`` / ``shift``: half the samples of 40 batches are random bytes / have shifted
  labels (a corrupted shard, read in order);
- ``lr``: clean data, the learning rate jumps 30x at step 330 (a schedule bug).

The table gives the verdict, the samples it named against the truth (precision, and
recall over the bad samples in the batches probed), rollbacks and final held-out loss
with and without the probe, and the probe's cost in forward passes and seconds, as a
ratio to one training step measured in the same run (the loop's wall time / steps).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
from pathlib import Path
from typing import Any

import torch

from spikewatch_hooks.demo.forensics_runs import ForensicsSettings, ScenarioResult, run
from spikewatch_hooks.demo.scenario import load_corpus

SCENARIOS = ("random", "shift", "lr")
RESULTS = Path(__file__).parent / "results" / "forensics.json"


def scores(result: ScenarioResult, s: ForensicsSettings) -> tuple[float, float]:
    """Precision of the named samples, recall over the bad samples probed."""
    verdict = result.stats.get("last_verdict") or {}
    probed = set(verdict.get("suspect_positions", []))
    truth = {i for i in result.poisoned if i // s.batch_size in probed}
    named = result.named
    precision = len(named & result.poisoned) / len(named) if named else float("nan")
    recall = len(named & truth) / len(truth) if truth else float("nan")
    return precision, recall


def measure(scenario: str, s: ForensicsSettings, corpus: Any) -> dict[str, Any]:
    """Train the scenario four ways; the row of the table."""
    runs = {
        "unguarded": run(scenario, s, corpus, guarded=False),  # type: ignore[arg-type]
        "blind": run(scenario, s, corpus, probe=False),  # type: ignore[arg-type]
        "probed": run(scenario, s, corpus),  # type: ignore[arg-type]
    }
    probed = runs["probed"]
    stats = probed.stats
    verdict = stats.get("last_verdict") or {}
    step_s = probed.train_seconds / max(1, len(probed.losses))
    precision, recall = scores(probed, s)
    return {
        "scenario": scenario,
        "verdict": verdict.get("cause"),
        "action": verdict.get("action"),
        "named": len(probed.named),
        "precision": precision,
        "recall": recall,
        "rollbacks_blind": runs["blind"].stats["rollbacks"],
        "rollbacks_probed": stats["rollbacks"],
        "loss_unguarded": runs["unguarded"].final_loss,
        "loss_blind": runs["blind"].final_loss,
        "loss_probed": probed.final_loss,
        "forward_passes": stats["probe_forward_passes"],
        "probe_s": stats["probe_seconds"],
        "step_ms": step_s * 1e3,
        "probe_in_steps": stats["probe_seconds"] / step_s,
    }


def table(rows: list[dict[str, Any]], clean: float) -> str:
    """The Markdown table the README quotes."""
    head = (
        "| scenario | verdict | action | named | precision | recall | rollbacks (no probe → probe) "
        "| final loss (unguarded / no probe / probe; clean "
        f"{clean:.3f}) | probe: forward passes | probe: s | probe / one step (x) |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|"
    )
    lines = [
        f"| {r['scenario']} | {r['verdict']} | {r['action']} | {r['named']} "
        f"| {_share(r['precision'])} | {_share(r['recall'])} "
        f"| {r['rollbacks_blind']} → {r['rollbacks_probed']} "
        f"| {r['loss_unguarded']:.3f} / {r['loss_blind']:.3f} / {r['loss_probed']:.3f} "
        f"| {r['forward_passes']} | {r['probe_s']:.3f} | {r['probe_in_steps']:.1f} |"
        for r in rows
    ]
    return "\n".join([head, *lines])


def _share(x: float) -> str:
    return "–" if math.isnan(x) else f"{x:.2f}"  # noqa: RUF001 (nothing was named)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--scenarios", default=",".join(SCENARIOS))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.ERROR)
    s, corpus = ForensicsSettings(), load_corpus()
    clean = run("clean", s, corpus)
    rows = [measure(name, s, corpus) for name in args.scenarios.split(",")]
    print(table(rows, clean.final_loss))
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps({"clean_loss": clean.final_loss, "rows": rows}, indent=1))
    print(f"\nwritten to {RESULTS}")


if __name__ == "__main__":
    main()
