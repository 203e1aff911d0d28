"""Distributed overhead: what `SpikeGuard`'s lockstep adds per step with 2 gloo ranks.

Run ``python bench/dist_overhead.py [--json] [--quick] [--pairs N]``. Two spawned ranks
(gloo on loopback, one torch thread each) run, in order:

1. the guard's collective alone, per step: ``Lockstep.stage`` each step and one
   ``Lockstep.gather`` (an all-gather of 8 x 2 floats per rank) every 8 steps, called
   back to back and amortised per step;
2. the model of ``examples/ddp_train.py`` trained by a bare DDP step (forward, backward,
   clip, ``optimizer.step()``, ``scheduler.step()``) and by a guarded one (the same with
   ``guard.step``), one of each in turn (AB, BA, ...) on clean data, wall-clock per
   step. Inside the guarded step the gather is timed too (in the loop it also waits
   for the slower rank), and so is the rest of ``guard.step`` less the optimizer's and
   scheduler's ``step`` (the guard's local work: detectors, snapshots; see
   ``bench/overhead.py``), with ``overhead.Probe``.

Reported, from rank 0 (rank 1's main figures beside them): medians. ``collective_us``
is the guard's distributed cost per step with both ranks ready; ``distributed_pct``
relates it to the bare step (target < 1 %); ``overhead_pct`` is the whole guarded step
against the bare one, so it holds the local work and the waits too.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from overhead import Probe  # bench/ is the script's folder
from spikewatch_hooks.core.values import StepValues
from spikewatch_hooks.distributed import lockstep as distributed
from spikewatch_hooks.distributed.lockstep import Lockstep
from spikewatch_hooks.guard import SpikeGuard

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "ddp_train.py"
WORLD_SIZE = 2
TARGET_PCT = 1.0
wall_ns = time.perf_counter_ns


def load_example() -> ModuleType:
    """``examples/ddp_train.py`` as a module (examples/ is not a package)."""
    spec = importlib.util.spec_from_file_location("ddp_train", EXAMPLE)
    if spec is None or spec.loader is None:
        raise FileNotFoundError(f"{EXAMPLE}: the example is missing; restore it from git")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve its annotations through it
    spec.loader.exec_module(module)
    return module


def collective_alone(calls: int, warmup: int = 200, every: int = 8) -> dict[str, list[float]]:
    """µs per step, back to back, both ranks in step: the guard's collective amortised
    (``every`` x ``Lockstep.stage`` + one ``Lockstep.gather``, divided by ``every``),
    the raw all-gather of the same size (gloo's floor), and the same with the all-gather
    replaced by a local copy (the guard's own CPU work)."""
    lockstep = Lockstep()
    loss, norm = torch.tensor(2.5), torch.tensor(1.0)
    local, flat = torch.ones(2 * every), torch.empty(2 * every * WORLD_SIZE)
    out: dict[str, list[float]] = {"combine": [], "all_gather": []}
    for step in range(0, (warmup + calls) * every, every):
        start = wall_ns()
        for k in range(every):
            lockstep.stage(step + k, step + k, None, loss, norm)
        lockstep.gather()
        middle = wall_ns()
        distributed._ALL_GATHER(flat, local)
        out["combine"].append((middle - start) / 1e3 / every)
        out["all_gather"].append((wall_ns() - middle) / 1e3 / every)
    saved = distributed._ALL_GATHER
    distributed._ALL_GATHER = _local_gather
    try:
        out["combine_cpu"] = []
        for step in range(0, (warmup + calls) * every, every):
            start = wall_ns()
            for k in range(every):
                lockstep.stage(step + k, step + k, None, loss, norm)
            lockstep.gather()
            out["combine_cpu"].append((wall_ns() - start) / 1e3 / every)
    finally:
        distributed._ALL_GATHER = saved
    return {k: v[warmup:] for k, v in out.items()}


def _local_gather(out: torch.Tensor, local: torch.Tensor, group: object = None) -> None:
    out.copy_(local.repeat(WORLD_SIZE))


class Training:
    """One DDP model of the example, its optimizer, schedule and clean data stream."""

    def __init__(self, ex: ModuleType, corpus: Any, *, guarded: bool) -> None:
        s = ex.Settings(steps=10**6)  # the schedule stays near its peak throughout
        self.ex = ex
        self.model, self.opt, self.sched = ex.make_training(corpus.vocab_size, s)
        stream: Iterator[Any] = ex.global_batches(
            corpus.tokens, s, rank=dist.get_rank(), world_size=WORLD_SIZE, poison=False
        )
        self.guard: SpikeGuard | None = None
        self.probe: Probe | None = None
        self.combine_us: list[float] = []
        self.local_us: list[float] = []
        self.forward_backward_ms: list[float] = []
        if guarded:
            self.guard = SpikeGuard(
                model=self.model,
                optimizer=self.opt,
                scheduler=self.sched,
                config=s.guard_config(),
                snapshot_every=s.snapshot_every,
                keep_snapshots=8,
            )
            self._time_combine()
            self.probe = Probe(self.guard)
            stream = self.guard.batches(stream)
        self.stream = stream

    def _time_combine(self) -> None:
        """Time the guard's collective: the gather every few steps (0 on other steps)."""
        assert self.guard is not None and self.guard.engine.lockstep is not None
        lockstep = self.guard.engine.lockstep
        inner = lockstep.gather
        self._gather_us = 0.0

        def timed(flag: float = 0.0) -> list[StepValues]:
            start = wall_ns()
            result = inner(flag)
            self._gather_us += (wall_ns() - start) / 1e3
            return result

        lockstep.gather = timed  # type: ignore[method-assign]

    def step(self) -> float:
        """One training step; its wall-clock ms."""
        start = wall_ns()
        loss, grad_norm = self.ex.forward_backward(self.model, next(self.stream))
        self.forward_backward_ms.append((wall_ns() - start) / 1e6)
        if self.probe is None:
            self.opt.step()
            self.sched.step()
        else:  # guard.step, its own time (less the optimizer's and scheduler's) noted
            self._gather_us = 0.0
            own_us = self.probe.step(loss, grad_norm)["own"] / 1e3
            self.combine_us.append(self._gather_us)
            self.local_us.append(own_us - self._gather_us)
        self.opt.zero_grad(set_to_none=True)
        return (wall_ns() - start) / 1e6


def paired_steps(bare: Training, guarded: Training, pairs: int, warmup: int = 10) -> list[Any]:
    """(bare ms, guarded ms) per pair, the order alternating AB, BA, ..."""
    for _ in range(warmup):
        bare.step(), guarded.step()
    for timings in (
        guarded.combine_us,
        guarded.local_us,
        *(t.forward_backward_ms for t in (bare, guarded)),
    ):
        timings.clear()
    rows = []
    for i in range(pairs):
        if i % 2 == 0:
            b, g = bare.step(), guarded.step()
        else:
            g, b = guarded.step(), bare.step()
        rows.append((b, g))
    return rows


def _worker(rank: int, store: str, out: str, pairs: int, calls: int) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD_SIZE)
    ex = load_example()
    corpus = ex.CharCorpus(ex.corpus_text())
    alone = collective_alone(calls)
    bare, guarded = Training(ex, corpus, guarded=False), Training(ex, corpus, guarded=True)
    rows = paired_steps(bare, guarded, pairs)
    assert guarded.guard is not None
    result = summarise(alone, rows, guarded.combine_us, guarded.local_us, guarded.guard.stats)
    result["forward_backward_ms_bare"] = statistics.median(bare.forward_backward_ms)
    result["forward_backward_ms_guarded"] = statistics.median(guarded.forward_backward_ms)
    result["params"] = sum(p.numel() for p in bare.model.parameters())
    Path(out, f"rank{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


def summarise(
    alone: dict[str, list[float]],
    rows: list[Any],
    combine_us: list[float],
    local_us: list[float],
    stats: dict[str, Any],
) -> dict[str, Any]:
    """Medians (and quartiles where the spread matters) of one rank's timings."""
    bare_ms = statistics.median(b for b, _ in rows)
    guarded_ms = statistics.median(g for _, g in rows)
    collective_us = statistics.median(alone["combine"])
    return {
        "collective_us": collective_us,
        "collective_quartiles_us": statistics.quantiles(alone["combine"], n=4),
        "raw_all_gather_us": statistics.median(alone["all_gather"]),
        "combine_cpu_us": statistics.median(alone["combine_cpu"]),
        "collective_in_loop_us": statistics.median(combine_us),
        "collective_in_loop_quartiles_us": statistics.quantiles(combine_us, n=4),
        "collective_in_loop_mean_us": statistics.mean(combine_us),
        "guard_local_us": statistics.median(local_us),
        "guard_local_mean_us": statistics.mean(local_us),
        "step_ms_bare": bare_ms,
        "step_ms_guarded": guarded_ms,
        "overhead_pct": 100.0 * (guarded_ms - bare_ms) / bare_ms,
        "paired_gap_us": 1e3 * statistics.median(g - b for b, g in rows),
        "distributed_pct": 100.0 * collective_us / 1e3 / bare_ms,
        "target_pct": TARGET_PCT,
        "pairs": len(rows),
        "collective_calls": len(alone["combine"]),
        "guard_actions": {k: stats[k] for k in ("rollbacks", "skipped_steps")},
    }


def benchmark(pairs: int, calls: int) -> dict[str, Any]:
    """Spawn the ranks; rank 0's result, with rank 1's collective medians beside it."""
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(  # type: ignore[attr-defined,no-untyped-call]
            _worker, args=(str(Path(tmp, "store")), tmp, pairs, calls), nprocs=WORLD_SIZE
        )
        r0, r1 = (json.loads(Path(tmp, f"rank{r}.json").read_text()) for r in (0, 1))
    r0["rank1"] = {k: r1[k] for k in ("collective_us", "collective_in_loop_us", "step_ms_bare")}
    return {
        **r0,
        "world_size": WORLD_SIZE,
        "backend": "gloo",
        "threads_per_rank": 1,
        "torch": torch.__version__,
    }


def report_text(r: dict[str, Any]) -> str:
    """The table."""
    q, ql = r["collective_quartiles_us"], r["collective_in_loop_quartiles_us"]
    rows = [
        ("guard collective per step, alone (µs)", f"{r['collective_us']:.1f}",
         f"{q[0]:.1f}..{q[2]:.1f} ({r['collective_calls']} calls)"),
        ("  of which gloo all-gather, raw (µs)", f"{r['raw_all_gather_us']:.1f}", "same calls"),
        ("  of which the guard's CPU work (µs)", f"{r['combine_cpu_us']:.1f}", "no collective"),
        ("guard collective per step, in the loop (µs)", f"{r['collective_in_loop_us']:.1f}",
         f"{ql[0]:.1f}..{ql[2]:.1f}, mean {r['collective_in_loop_mean_us']:.1f} "
         "(waits for the slower rank)"),
        ("guard.step's local work, in the loop (µs)", f"{r['guard_local_us']:.1f}",
         f"mean {r['guard_local_mean_us']:.1f} (snapshots every 10 steps)"),
        ("bare DDP step (ms)", f"{r['step_ms_bare']:.2f}",
         f"forward+backward+clip {r['forward_backward_ms_bare']:.2f}"),
        ("guarded DDP step (ms)", f"{r['step_ms_guarded']:.2f}",
         f"forward+backward+clip {r['forward_backward_ms_guarded']:.2f}"),
        ("paired gap, guarded - bare (µs)", f"{r['paired_gap_us']:.1f}",
         f"{r['pairs']} AB/BA pairs"),
        ("whole-step overhead (%)", f"{r['overhead_pct']:.2f}", ""),
        ("guard's collective / bare step (%)", f"{r['distributed_pct']:.3f}",
         f"target < {r['target_pct']}"),
    ]  # fmt: skip
    r1 = r["rank1"]
    return "\n".join(
        [
            f"torch {r['torch']}, {r['world_size']} ranks, {r['backend']}, "
            f"{r['threads_per_rank']} thread per rank; example model {r['params']:,} params",
            f"{'measure (rank 0)':<44}{'median':>10}  notes",
            *(f"{name:<44}{value:>10}  {note}" for name, value, note in rows),
            f"rank 1: collective alone {r1['collective_us']:.1f} µs, in loop "
            f"{r1['collective_in_loop_us']:.1f} µs, bare step {r1['step_ms_bare']:.2f} ms; "
            f"guard actions {r['guard_actions']}",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    """Parse the command line, run, print the table or JSON."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print JSON instead of the table")
    parser.add_argument("--quick", action="store_true", help="fewer steps, a few seconds")
    parser.add_argument("--pairs", type=int, default=None, help="bare/guarded step pairs")
    args = parser.parse_args(argv)
    pairs = args.pairs or (40 if args.quick else 400)
    result = benchmark(pairs, calls=300 if args.quick else 3000)
    print(json.dumps(result, indent=2) if args.json else report_text(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
