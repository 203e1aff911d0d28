"""Hook overhead: CPU time per training step that `SpikeGuard` adds to a bare loop.

Run ``python bench/overhead.py [--json] [--quick] [--threads N]``. For each model size one
model, AdamW optimizer, LambdaLR scheduler and set of batches is trained by the bare loop
(which calls ``optimizer.step()`` / ``scheduler.step()`` itself) and by the guarded loop
(``guard.batches`` + ``guard.step`` at the defaults ``snapshot_every=100``,
``keep_snapshots=4``), one step of each in turn (AB, BA, ...).

The added time is read inside the guarded loop: the time of ``guard.step`` minus the time
spent in the optimizer's and scheduler's ``step`` (timed by wrappers that the bare loop
goes through too), so the guard's own work is measured with the caches as cold as a real
training step leaves them (here about 4x its hot-cache cost). It is the median over steps
without a snapshot plus the snapshots spread over all steps:
- measured: the timed steps hold snapshots (a multiple of ``snapshot_every`` pairs);
- accounted (the 100M model, whose steps take a second): the steady snapshot time,
  measured on its own, / ``snapshot_every``; per step, the larger of its own few steps
  (detectors still in warm-up, cheaper) and the measured rows' per-step cost.
Cross-check: the paired gap of whole steps (process CPU time), noisy on a busy host.
A hot-cache microbenchmark of ``guard.step`` with a no-op optimizer and scheduler
shows the guard's floor and where the µs go.
HF ``Trainer``: `overhead_hf` (the callback at ``logging_steps=50`` against a bare
Trainer) prints its table after these (``--no-hf`` leaves it out).
Service mode: each measured size again with ``monitor_url=`` a real ``spikewatch serve``
started by the bench on loopback (the guard's own monitor still decides; the client only
queues records and decisions for its sender thread); the table's last line is its
overhead minus the embedded one.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import itertools
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from spikewatch_hooks.demo.model import TinyGPT
from spikewatch_hooks.guard import SpikeGuard
from spikewatch_hooks.state.snapshots.ring import SnapshotRing

SNAPSHOT_EVERY = 100  # SpikeGuard's default, used unchanged
Batch = tuple[torch.Tensor, torch.Tensor]
Step = tuple[torch.Tensor, torch.Tensor]
wall_ns = time.perf_counter_ns
# piece -> (engine attribute, method), each timed by a wrapper
PIECES = {
    "push": ("values", "push"),  # stack loss and grad norm into the host ring
    "ready": ("values", "ready"),  # read the ring back as floats
    "monitor": ("transport", "submit"),  # detectors and policy on the step's record
}


@dataclass(frozen=True, kw_only=True)
class Size:
    """One model and how many of its steps are timed."""

    name: str
    vocab: int
    context: int
    dim: int
    layers: int
    heads: int
    batch: int
    pairs: int
    """Bare/guarded step pairs timed: at least SNAPSHOT_EVERY make the row 'measured'."""
    snapshot_repeats: int = 3


SIZES = (
    Size(name="small", vocab=256, context=32, dim=128, layers=4, heads=4, batch=8, pairs=600),
    Size(name="100M", vocab=8192, context=32, dim=768, layers=12, heads=12, batch=2, pairs=8),
)
QUICK_SIZES = (
    Size(name="tiny", vocab=64, context=16, dim=32, layers=1, heads=2, batch=4, pairs=200,
         snapshot_repeats=2),
    Size(name="tiny-accounted", vocab=64, context=16, dim=64, layers=2, heads=2, batch=4,
         pairs=10, snapshot_repeats=2),
)  # fmt: skip


@dataclass
class Run:
    """The live training objects of one size, shared by the bare and the guarded loop."""

    model: TinyGPT
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    batches: list[Batch]


def make_run(size: Size, *, device: str = "cpu", seed: int = 0) -> Run:
    """A seeded model, AdamW, a constant LambdaLR and eight batches of random tokens."""
    torch.manual_seed(seed)
    model = TinyGPT(
        size.vocab, context=size.context, dim=size.dim, layers=size.layers, heads=size.heads
    ).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _constant)
    shape = (size.batch, size.context)
    batches = [
        (torch.randint(0, size.vocab, shape, device=device),
         torch.randint(0, size.vocab, shape, device=device))
        for _ in range(8)
    ]  # fmt: skip
    return Run(model, opt, sched, batches)


def _constant(step: int) -> float:
    return 1.0


def forward_backward(model: TinyGPT, batch: Batch) -> Step:
    """Loss and backward, then clip: returns the loss and the pre-clip grad norm."""
    loss = model.loss(*batch)
    loss.backward()  # type: ignore[no-untyped-call]
    return loss, torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)


def bare_step(run: Run, batch: Batch) -> None:
    """One step of the bare loop."""
    forward_backward(run.model, batch)
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)


def _wrap(owner: object, method: str, sink: list[int]) -> None:
    """Time every call of ``owner.method`` into ``sink`` (through an instance attribute)."""
    inner: Callable[..., Any] = getattr(owner, method)

    @functools.wraps(inner)  # keeps the marks LRScheduler set on optimizer.step
    def timed(*args: Any, **kwargs: Any) -> Any:
        start = wall_ns()
        result = inner(*args, **kwargs)
        sink.append(wall_ns() - start)
        return result

    setattr(owner, method, timed)


class Probe:
    """Times ``guard.step`` and, inside it, the optimizer's and scheduler's ``step`` and
    the guard's pieces: the guard's own time is the rest."""

    def __init__(self, guard: SpikeGuard) -> None:
        engine = guard.engine
        self.guard = guard
        self.sinks: dict[str, list[int]] = {n: [] for n in ("optimizer", "scheduler", *PIECES)}
        _wrap(engine.optimizer, "step", self.sinks["optimizer"])
        _wrap(engine.scheduler, "step", self.sinks["scheduler"])
        for name, (owner, method) in PIECES.items():
            _wrap(getattr(engine, owner), method, self.sinks[name])

    def step(self, loss: torch.Tensor, grad_norm: torch.Tensor) -> dict[str, int]:
        """``guard.step``; ns of the guard's own work (``own``) and of each piece."""
        for sink in self.sinks.values():
            sink.clear()
        start = wall_ns()
        self.guard.step(loss=loss, grad_norm=grad_norm)
        total = wall_ns() - start
        spent = {name: sum(sink) for name, sink in self.sinks.items()}
        return {"own": total - spent.pop("optimizer") - spent.pop("scheduler"), **spent}


def _guarded_step(run: Run, probe: Probe, batch: Batch) -> dict[str, int]:
    result = probe.step(*forward_backward(run.model, batch))
    run.optimizer.zero_grad(set_to_none=True)
    return result


def time_pairs(run: Run, guard: SpikeGuard, pairs: int) -> list[dict[str, Any]]:
    """Per pair: bare and guarded step CPU ns, the guard's own ns, whether it snapshotted."""
    probe = Probe(guard)
    bare_stream = itertools.cycle(run.batches)
    guarded_stream: Iterator[Batch] = guard.batches(itertools.cycle(run.batches))
    for _ in range(3):  # warm-up, not timed
        bare_step(run, next(bare_stream))
        _guarded_step(run, probe, next(guarded_stream))
    out = []
    for i in range(pairs):
        b_batch, g_batch = next(bare_stream), next(guarded_stream)
        row: dict[str, Any] = {}
        for which in ("bare", "guarded") if i % 2 == 0 else ("guarded", "bare"):
            start = time.process_time_ns()
            if which == "bare":
                bare_step(run, b_batch)
            else:
                row |= _guarded_step(run, probe, g_batch)
            row[which] = time.process_time_ns() - start
        row["snapshot"] = guard.step_count % SNAPSHOT_EVERY == 0
        out.append(row)
    return out


def robust_added(rows: Sequence[dict[str, Any]], value: Callable[[dict[str, Any]], float]) -> Any:
    """Median over rows without a snapshot (robust to a busy host's load spikes), plus
    the snapshot rows' extra spread over all rows (amortised)."""
    plain = [value(r) for r in rows if not r["snapshot"]]
    per_step = statistics.median(plain)
    extra = sum(value(r) - per_step for r in rows if r["snapshot"]) / len(rows)
    return {
        "per_step_median_us": per_step,
        "snapshots_amortised_us": extra,
        "mean_us": statistics.mean(value(r) for r in rows),
        "quartiles_us": statistics.quantiles(plain, n=4),
    }


def summarise_pairs(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The guard's own time in the loop, by piece, and the paired step gap."""
    plain = [r for r in rows if not r["snapshot"]]
    pieces = {k: statistics.median(r[k] for r in plain) / 1e3 for k in (*PIECES, "own")}
    return {
        "pairs": len(rows),
        "snapshot_pairs": len(rows) - len(plain),
        "bare_step_us": statistics.median(r["bare"] for r in rows) / 1e3,
        "own": robust_added(rows, lambda r: r["own"] / 1e3),
        "gap": robust_added(rows, lambda r: (r["guarded"] - r["bare"]) / 1e3),
        "own_pieces_median_us": pieces,
    }


def snapshot_cost(run: Run, guard: SpikeGuard, repeats: int) -> dict[str, float]:
    """One snapshot as the guard takes it, in CPU ms: first (allocates) and steady."""
    ring = SnapshotRing(run.model, run.optimizer, run.scheduler, keep=1)

    def take() -> float:
        start = time.process_time_ns()
        extra = {"detector_state": guard.transport.detector_state(), "lr_scale": 1.0}
        ring.take(0, 0, extra)
        return (time.process_time_ns() - start) / 1e6

    first = take()
    steady = statistics.median(take() for _ in range(repeats))
    return {
        "first_ms": first,
        "steady_ms": steady,
        "bytes": ring.nbytes,
        "steady_gb_per_s": ring.nbytes / steady / 1e6,
        "amortised_us_per_step": steady * 1e3 / SNAPSHOT_EVERY,
    }


class _NoOpOptimizer(torch.optim.Optimizer):
    """Steps nothing: the microbenchmark times the guard's own work alone."""

    def __init__(self, params: Any) -> None:
        super().__init__(params, defaults={"lr": 1e-3})

    def step(self, closure: Any = None) -> None:  # type: ignore[override]
        return None


class _NoOpScheduler:
    def step(self) -> None:
        return None

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        return None


def step_tensors(n: int, seed: int = 0) -> list[Step]:
    """(loss, grad norm) 0-d tensors of a calm, falling, noisy curve; losses need grad."""
    rng = random.Random(seed)
    out = []
    for t in range(n):
        loss = 4.0 * (0.6 + 0.4 * 0.999**t) + rng.gauss(0.0, 0.03)
        norm = 1.0 + 0.1 * abs(rng.gauss(0.0, 1.0))
        out.append((torch.tensor(loss, requires_grad=True), torch.tensor(norm)))
    return out


def guard_step_cost(steps: int, warmup: int = 300) -> dict[str, Any]:
    """Hot-cache µs of ``guard.step`` beyond its (no-op) optimizer and scheduler calls."""
    model = nn.Linear(4, 4)  # the per-step path never touches parameters
    guard = SpikeGuard(
        model=model,
        optimizer=_NoOpOptimizer(model.parameters()),
        scheduler=_NoOpScheduler(),
        snapshot_every=10**9,  # snapshots are timed on the real models
    )
    probe = Probe(guard)
    rows = [probe.step(loss, norm) for loss, norm in step_tensors(warmup + steps)][warmup:]
    own = [r["own"] / 1e3 for r in rows]
    pieces = {k: statistics.median(r[k] for r in rows) / 1e3 for k in PIECES}
    rest = statistics.median(r["own"] - sum(r[k] for k in PIECES) for r in rows) / 1e3
    return {
        "guard_step_median_us": statistics.median(own),
        "guard_step_mean_us": statistics.mean(own),
        "guard_step_max_us": max(own),
        "pieces_median_us": {**pieces, "rest": rest},
        "steps": steps,
    }


def measure_size(size: Size, floor_us: float = 0.0, service: str | None = None) -> dict[str, Any]:
    """Everything the report says about one size.

    ``floor_us``: for an accounted row, the per-step cost measured on the measured rows.
    A few steps leave the detectors in their (cheaper) warm-up, and the per-step path
    does not depend on the model, so the larger of the two is used.
    ``service``: the URL of a `spikewatch serve` to report to (service mode).
    """
    run = make_run(size)
    guard = SpikeGuard(
        model=run.model,
        optimizer=run.optimizer,
        scheduler=run.scheduler,
        monitor_url=service,
        token=SERVICE_TOKEN if service else None,
    )
    pairs = summarise_pairs(time_pairs(run, guard, size.pairs))
    snap = snapshot_cost(run, guard, size.snapshot_repeats)
    own = pairs["own"]
    measured = pairs["snapshot_pairs"] > 0
    if measured:
        added_us = own["per_step_median_us"] + own["snapshots_amortised_us"]
    else:
        added_us = max(own["per_step_median_us"], floor_us) + snap["amortised_us_per_step"]
    bare_us = pairs["bare_step_us"]
    guard.close(timeout=5.0)  # service mode: deliver, finish, stop the sender thread
    return {
        "params": sum(p.numel() for p in run.model.parameters()),
        "basis": "measured" if measured else "accounted",
        "bare_step_ms": bare_us / 1e3,
        "guarded_step_ms": (bare_us + added_us) / 1e3,
        "added_us": added_us,
        "overhead_pct": 100.0 * added_us / bare_us,
        "in_loop": pairs,
        "snapshot": snap,
        "guard_stats": {k: guard.stats[k] for k in ("rollbacks", "skipped_steps", "incidents")},
        "model": asdict(size),
        "mode": "service" if service else "embedded",
    }


SERVICE_TOKEN = "bench-token-0123456789"


@contextlib.contextmanager
def running_service() -> Iterator[str]:
    """A real `spikewatch serve` on a free loopback port with a throwaway store."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "spikewatch.cli", "serve", "--port", str(port),
               "--db", os.path.join(tmp, "events.db")]  # fmt: skip
        env = {**os.environ, "SPIKEWATCH_TOKEN": SERVICE_TOKEN}
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                try:
                    with urllib.request.urlopen(url + "/healthz", timeout=1):
                        break
                except OSError:
                    time.sleep(0.1)
            yield url
        finally:
            proc.terminate()
            proc.wait(timeout=10)


def benchmark(sizes: Sequence[Size], threads: int, microbench_steps: int) -> dict[str, Any]:
    """The result: the headline, one entry per size, the hot-cache microbenchmark."""
    torch.set_num_threads(threads)
    results: dict[str, dict[str, Any]] = {}
    floor = 0.0
    for size in sorted(sizes, key=lambda s: s.pairs < SNAPSHOT_EVERY):  # measured first
        results[size.name] = r = measure_size(size, floor)
        if r["basis"] == "measured":
            floor = max(floor, r["in_loop"]["own"]["per_step_median_us"])
    service_rows = {}
    with running_service() as url:  # service mode: the same sizes, reporting to a service
        for size in sizes:
            if results[size.name]["basis"] == "measured":
                service_rows[f"{size.name} (service)"] = measure_size(size, service=url)
    gap = max(
        row["overhead_pct"] - results[name.removesuffix(" (service)")]["overhead_pct"]
        for name, row in service_rows.items()
    )
    return {
        "overhead_pct": max(r["overhead_pct"] for r in results.values()),
        "service_added_pct": gap,
        "service_target_pct": 0.5,
        "target_pct": 1.0,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "snapshot_every": SNAPSHOT_EVERY,
        "keep_snapshots": 4,
        "sizes": {**{s.name: results[s.name] for s in sizes}, **service_rows},
        "microbench": guard_step_cost(microbench_steps),
    }


def _size_lines(name: str, r: dict[str, Any]) -> list[str]:
    own, gap, s = r["in_loop"]["own"], r["in_loop"]["gap"], r["snapshot"]
    pieces = ", ".join(f"{k} {v:.1f}" for k, v in r["in_loop"]["own_pieces_median_us"].items())
    q1, _, q3 = gap["quartiles_us"]
    return [
        f"{name:<16}own {own['per_step_median_us']:.1f} + snapshots in window "
        f"{own['snapshots_amortised_us']:.1f} µs/step; snapshot alone {s['bytes'] / 1e6:.1f} MB: "
        f"first {s['first_ms']:.1f} ms, steady {s['steady_ms']:.1f} ms "
        f"({s['steady_gb_per_s']:.1f} GB/s) = {s['amortised_us_per_step']:.1f} µs/step",
        f"{'':<16}median µs: {pieces}",
        f"{'':<16}cross-check, paired step gap ({r['in_loop']['pairs']} pairs): "
        f"{gap['per_step_median_us']:.0f} (IQR {q1:.0f}..{q3:.0f}) "
        f"+ {gap['snapshots_amortised_us']:.0f} µs",
    ]


def report_text(result: dict[str, Any]) -> str:
    """The tables: per size, where the guard's µs go in the loop, the microbenchmark."""
    lines = [
        f"torch {result['torch']}, {result['threads']} thread(s); "
        f"snapshot_every={result['snapshot_every']}, keep_snapshots={result['keep_snapshots']}",
        f"{'model':<16}{'params':>12}{'bare ms':>10}{'guarded ms':>12}{'added µs':>10}"
        f"{'overhead %':>12}  basis",
    ]
    for name, r in result["sizes"].items():
        lines.append(
            f"{name:<16}{r['params']:>12,}{r['bare_step_ms']:>10.2f}{r['guarded_step_ms']:>12.2f}"
            f"{r['added_us']:>10.1f}{r['overhead_pct']:>12.3f}  {r['basis']}"
        )
    lines += ["", "in the loop (guard.step minus optimizer/scheduler step)"]
    for name, r in result["sizes"].items():
        lines += _size_lines(name, r)
    g = result["microbench"]
    pieces = ", ".join(f"{k} {v:.1f}" for k, v in g["pieces_median_us"].items())
    lines += [
        "",
        f"microbenchmark, hot caches, no-op optimizer/scheduler, {g['steps']} steps: "
        f"median {g['guard_step_median_us']:.1f} µs, mean {g['guard_step_mean_us']:.1f}, "
        f"max {g['guard_step_max_us']:.0f}; median µs: {pieces}",
        f"headline overhead: {result['overhead_pct']:.3f}% (target <= {result['target_pct']}%)",
        f"service mode adds {result['service_added_pct']:.3f}% of the step over embedded "
        f"(target <= {result['service_target_pct']}%)",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the command line, run the benchmark, print tables or JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--json", action="store_true", help="print JSON instead of tables")
    parser.add_argument("--quick", action="store_true", help="tiny models, a few seconds")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (default 1: a shared 2-core host)"
    )
    parser.add_argument(
        "--no-hf", action="store_true", help="leave out the HF Trainer table (overhead_hf.py)"
    )
    args = parser.parse_args(argv)
    sizes = QUICK_SIZES if args.quick else SIZES
    result = benchmark(sizes, args.threads, microbench_steps=500 if args.quick else 3000)
    text = report_text(result)
    if not args.no_hf:  # the HF callback at logging_steps=50 against a bare Trainer
        import overhead_hf  # noqa: PLC0415 (transformers only when asked; bench/ is on the path)

        hf_sizes = overhead_hf.SIZES[:1] if args.quick else overhead_hf.SIZES
        result["hf"] = overhead_hf.benchmark(hf_sizes, 40 if args.quick else 400)
        text += "\n\n" + overhead_hf.report_text(result["hf"])
    print(json.dumps(result, indent=2) if args.json else text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
