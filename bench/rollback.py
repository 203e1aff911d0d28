"""Rollback speed: restore from the in-memory snapshot ring vs reload from local disk.

Run ``python bench/rollback.py [--json] [--quick] [--threads N]``. For each size a
`TinyGPT` with AdamW state populated (one optimizer step taken) and a LambdaLR scheduler
is snapshotted into a `SnapshotRing` and saved with ``torch.save`` (model, optimizer,
scheduler and RNG state: what the ring holds) to a temporary folder. Then, alternating
(AB, BA, ...), the live state is perturbed and restored by:
- ring: ``SnapshotRing.restore`` (in-place copies into the live tensors);
- disk: ``torch.load`` + ``load_state_dict`` into the live model, optimizer and
  scheduler + RNG state: the full restore.
The headline compares the ring with what rolling back from disk costs without spikewatch:
restarting, i.e. ``torch.load`` + ``load_state_dict`` in a *fresh process* (measured in
child processes that build the same model and optimizer, then time only the load). Also
reported: the same load repeated in this process with the file in the page cache and the
allocator warm (the best case for ``torch.load``), the first in-process load, and a load
after ``posix_fadvise(DONTNEED)``. Wall-clock times; medians over rounds.
``--distributed`` runs `rollback_dist` instead: the ring's layouts on 2 gloo ranks (DDP
split vs full copies, FSDP2 shards), bytes per rank, restore times, and restore
bandwidth as a ratio to a plain ``copy_`` of the same bytes.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from spikewatch_hooks.demo.model import TinyGPT
from spikewatch_hooks.state.rng import rng_state, set_rng_state
from spikewatch_hooks.state.snapshots.ring import Snapshot, SnapshotRing


@dataclass(frozen=True, kw_only=True)
class Size:
    """One model of the benchmark."""

    name: str
    vocab: int
    dim: int
    layers: int
    heads: int
    rounds: int


SIZES = (
    Size(name="10M", vocab=8192, dim=256, layers=8, heads=8, rounds=7),
    Size(name="100M", vocab=8192, dim=768, layers=12, heads=12, rounds=5),
)
QUICK_SIZES = (
    Size(name="tiny", vocab=64, dim=32, layers=1, heads=2, rounds=3),
    Size(name="small", vocab=256, dim=64, layers=2, heads=2, rounds=3),
)
CONTEXT = 16


@dataclass
class Live:
    """The training objects whose state is snapshotted and restored."""

    model: TinyGPT
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler


def make_live(size: Size, seed: int = 0) -> Live:
    """A seeded model with AdamW moments populated by one step, and a stepped scheduler."""
    torch.manual_seed(seed)
    model = TinyGPT(size.vocab, context=CONTEXT, dim=size.dim, layers=size.layers, heads=size.heads)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _constant)
    tokens = torch.randint(0, size.vocab, (2, CONTEXT))
    model.loss(tokens, tokens).backward()  # type: ignore[no-untyped-call]
    opt.step()
    sched.step()
    opt.zero_grad(set_to_none=True)
    return Live(model, opt, sched)


def _constant(step: int) -> float:
    return 1.0


def seconds(work: Callable[[], object]) -> float:
    """Wall seconds of ``work()``."""
    start = time.perf_counter()
    work()
    return time.perf_counter() - start


def perturb(live: Live) -> None:
    """Change the live weights and moments, so a restore has something to undo."""
    with torch.no_grad():
        for p in live.model.parameters():
            p.add_(1.0)
            for value in live.optimizer.state[p].values():
                if isinstance(value, torch.Tensor) and value.dim() > 0:
                    value.mul_(2.0)


def save_state(live: Live, path: Path) -> float:
    """``torch.save`` the state the ring holds; returns the seconds it took (with fsync)."""

    def write() -> None:
        payload = {
            "model": live.model.state_dict(),
            "optimizer": live.optimizer.state_dict(),
            "scheduler": live.scheduler.state_dict(),
            "rng": rng_state(),
        }
        with path.open("wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())

    return seconds(write)


def disk_restore(live: Live, path: Path) -> None:
    """The full restore from disk: load, then copy into the live objects."""
    payload = torch.load(path, map_location="cpu", weights_only=True)
    live.model.load_state_dict(payload["model"])
    live.optimizer.load_state_dict(payload["optimizer"])
    live.scheduler.load_state_dict(payload["scheduler"])
    set_rng_state(payload["rng"])


def evict(path: Path) -> bool:
    """Ask the kernel to drop ``path`` from the page cache (False where it cannot)."""
    if not hasattr(os, "posix_fadvise"):
        return False
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    return True


def take_times(ring: SnapshotRing, repeats: int = 3) -> tuple[Snapshot, float, float]:
    """The ring's snapshot, first take (allocates buffers) and steady take, seconds."""
    first = seconds(lambda: ring.take(1, 1))
    steady = statistics.median(seconds(lambda: ring.take(1, 1)) for _ in range(repeats))
    snap = ring.newest_at_or_before(1)
    assert snap is not None  # just taken
    return snap, first, steady


def alternate(live: Live, ring: SnapshotRing, snap: Snapshot, path: Path, rounds: int) -> Any:
    """Median seconds of ring and disk restores, alternating order every round."""
    restores: dict[str, Callable[[], None]] = {
        "ring": lambda: ring.restore(snap),
        "disk": lambda: disk_restore(live, path),
    }
    times: dict[str, list[float]] = {"ring": [], "disk": []}
    for r in range(rounds):
        for name in ("ring", "disk") if r % 2 == 0 else ("disk", "ring"):
            perturb(live)
            times[name].append(seconds(restores[name]))
    return {name: statistics.median(t) for name, t in times.items()}, times


def check_same(live: Live, snap: Snapshot) -> None:
    """Both restores must give the snapshot's weights (a benchmark of a broken restore is
    worthless)."""
    for name, tensor in live.model.state_dict().items():
        if not torch.equal(tensor, snap.model[name]):
            raise SystemExit(f"restore mismatch in {name}; the benchmark is invalid")


def restart_load_seconds(size: Size, path: Path, runs: int = 2) -> float:
    """Median seconds of the disk restore in fresh processes (what a restart pays)."""
    times = []
    for _ in range(runs):
        out = subprocess.run(
            [sys.executable, __file__, "--restart-child", size.name, str(path)],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        times.append(float(out.strip().splitlines()[-1]))
    return statistics.median(times)


def _restart_child(name: str, path: str, threads: int) -> int:
    torch.set_num_threads(threads)
    size = next(s for s in (*SIZES, *QUICK_SIZES) if s.name == name)
    live = make_live(size)
    perturb(live)
    sys.stdout.write(f"{seconds(lambda: disk_restore(live, Path(path)))}\n")
    return 0


def measure_size(size: Size, folder: Path) -> dict[str, Any]:
    """Take, save, restore both ways; times and rates for one size."""
    live = make_live(size)
    ring = SnapshotRing(live.model, live.optimizer, live.scheduler, keep=1)
    snap, take_first, take_steady = take_times(ring)
    path = folder / f"{size.name}.pt"
    save_s = save_state(live, path)
    perturb(live)
    first_load = seconds(lambda: disk_restore(live, path))
    medians, all_times = alternate(live, ring, snap, path, size.rounds)
    check_same(live, snap)
    restart = restart_load_seconds(size, path)
    evicted = evict(path)
    cold = seconds(lambda: disk_restore(live, path)) if evicted else None
    nbytes = snap.nbytes
    return {
        "params": sum(p.numel() for p in live.model.parameters()),
        "bytes": nbytes,
        "file_bytes": path.stat().st_size,
        "take_first_ms": take_first * 1e3,
        "take_ms": take_steady * 1e3,
        "take_gb_per_s": nbytes / take_steady / 1e9,
        "ring_restore_ms": medians["ring"] * 1e3,
        "ring_gb_per_s": nbytes / medians["ring"] / 1e9,
        "torch_load_ms": medians["disk"] * 1e3,
        "torch_load_gb_per_s": nbytes / medians["disk"] / 1e9,
        "torch_load_first_ms": first_load * 1e3,
        "torch_load_evicted_ms": None if cold is None else cold * 1e3,
        "torch_save_ms": save_s * 1e3,
        "torch_load_restart_ms": restart * 1e3,
        "speedup_vs_torch_load": restart / medians["ring"],
        "speedup_vs_warm_reload": medians["disk"] / medians["ring"],
        "rounds_ms": {k: [t * 1e3 for t in v] for k, v in all_times.items()},
        "model": asdict(size),
    }


def benchmark(sizes: Sequence[Size], threads: int) -> dict[str, Any]:
    """One entry per size; the headline is the speedup at the largest size."""
    torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory(prefix="spikewatch-rollback-") as tmp:
        results = {s.name: measure_size(s, Path(tmp)) for s in sizes}
    largest = max(results.values(), key=lambda r: r["params"])
    return {
        "speedup_vs_torch_load": largest["speedup_vs_torch_load"],
        "speedup_vs_warm_reload": largest["speedup_vs_warm_reload"],
        "target_speedup": 20.0,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "sizes": results,
    }


def report_text(result: dict[str, Any]) -> str:
    """One row per size: take, ring restore, torch.load restore (warm/first/evicted)."""
    lines = [
        f"torch {result['torch']}, {result['threads']} thread(s); wall ms, medians; "
        "torch.load = load + load_state_dict; restart = in a fresh process; warm = repeated "
        "here, file in page cache",
        f"{'model':<7}{'params':>12}{'MB':>8}{'take':>8}{'ring':>8}{'GB/s':>6}"
        f"{'restart':>9}{'warm':>8}{'1st':>8}{'evicted':>9}{'vs restart':>11}{'vs warm':>9}",
    ]
    for name, r in result["sizes"].items():
        evicted = r["torch_load_evicted_ms"]
        lines.append(
            f"{name:<7}{r['params']:>12,}{r['bytes'] / 1e6:>8.0f}{r['take_ms']:>8.1f}"
            f"{r['ring_restore_ms']:>8.1f}{r['ring_gb_per_s']:>6.1f}"
            f"{r['torch_load_restart_ms']:>9.1f}{r['torch_load_ms']:>8.1f}"
            f"{r['torch_load_first_ms']:>8.1f}{'-' if evicted is None else f'{evicted:.1f}':>9}"
            f"{r['speedup_vs_torch_load']:>10.1f}x{r['speedup_vs_warm_reload']:>8.1f}x"
        )
    lines.append(
        "first take (allocates the slot): "
        + ", ".join(f"{n} {r['take_first_ms']:.0f} ms" for n, r in result["sizes"].items())
    )
    lines.append(
        f"speedup at the largest size: {result['speedup_vs_torch_load']:.1f}x vs a restart's "
        f"torch.load (target >= {result['target_speedup']:.0f}x); "
        f"{result['speedup_vs_warm_reload']:.1f}x vs a warm in-process reload"
    )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the command line, run the benchmark, print a table or JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--quick", action="store_true", help="tiny models, a few seconds")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (default 1: a shared 2-core host)"
    )
    parser.add_argument(
        "--restart-child", nargs=2, metavar=("SIZE", "PATH"), help=argparse.SUPPRESS
    )
    parser.add_argument("--distributed", action="store_true", help="2-rank ring layouts")
    args = parser.parse_args(argv)
    if args.distributed:
        import rollback_dist  # noqa: PLC0415 (spawns processes: only when asked)

        return rollback_dist.main([*(["--json"] if args.json else []),
                                   *(["--quick"] if args.quick else [])])  # fmt: skip
    if args.restart_child:
        name, path = args.restart_child
        return _restart_child(name, path, threads=args.threads)
    result = benchmark(QUICK_SIZES if args.quick else SIZES, args.threads)
    print(json.dumps(result, indent=2) if args.json else report_text(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
