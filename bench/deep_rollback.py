"""Deep rollback: a rollback from the in-memory ring vs one the ring cannot reach, which
restores the automatic disk checkpoint in the running process (`core.restore`).

Run ``python bench/deep_rollback.py [--quick] [--threads N]``. For each size a `TinyGPT`
with AdamW and a LambdaLR scheduler is guarded by a `SpikeGuard` with ``checkpoint_dir``;
its state at step 1 is written as ``spikewatch-latest.pt`` and held in the ring. Then,
alternating, the guard rolls back:
- ring: to a target the ring holds (in-place copies into the live tensors);
- disk: to a target older than every ring snapshot: verify and load the checkpoint,
  ``load_state_dict`` into the live objects, keep the live ledger, and take the new
  ring's first snapshot (what the deep path really costs).
Wall-clock medians; the ratio is disk / ring, measured in the same run.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from rollback import QUICK_SIZES, SIZES, Size, make_live, perturb
from spikewatch.records import Decision
from spikewatch_hooks.guard import SpikeGuard


def _decision(target: int) -> Decision:
    return Decision(run="bench", step=1, action="rollback", reason="bench",
                    rollback_before_step=target)  # fmt: skip


def measure(size: Size, folder: Path, rounds: int) -> dict[str, float]:
    """Median ms of a ring rollback and of a deep (disk) rollback, and their ratio."""
    live = make_live(size)
    guard = SpikeGuard(live.model, live.optimizer, live.scheduler, keep_snapshots=1,
                       checkpoint_dir=folder, checkpoint_every=1)  # fmt: skip
    engine = guard.engine
    engine.step_count = 10
    engine.ring = engine._new_ring(1)
    engine._snapshot(next_position=10)  # the ring holds step 10 only
    engine.step_count = 5
    assert engine.disk is not None
    engine.disk.save_auto(engine)  # the disk holds step 5
    ring_ms: list[float] = []
    disk_ms: list[float] = []
    for _ in range(rounds):
        for target, out in ((10, ring_ms), (7, disk_ms)):
            if target == 10 and engine.ring.steps != [10]:
                engine.step_count = 10
                engine.ring = engine._new_ring(1)
                engine._snapshot(next_position=10)
            perturb(live)
            engine.step_count, engine.position = 20, 19
            start = time.perf_counter()
            engine.rollback(_decision(target))
            out.append((time.perf_counter() - start) * 1e3)
            assert engine.step_count == (10 if target == 10 else 5)
    ring, disk = statistics.median(ring_ms), statistics.median(disk_ms)
    params = sum(p.numel() for p in live.model.parameters())
    return {"params": params, "ring_ms": ring, "disk_ms": disk, "ratio": disk / ring}


def main(argv: Sequence[str] | None = None) -> int:
    """Print one row per size: params, ring ms, disk ms, disk / ring."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="tiny models, a few seconds")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    args = parser.parse_args(argv)
    logging.getLogger("spikewatch_hooks").setLevel(logging.ERROR)  # one line per rollback
    torch.set_num_threads(args.threads)
    sizes = QUICK_SIZES if args.quick else SIZES[:1]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s); wall ms, medians")
    print(f"{'model':<7}{'params':>12}{'ring':>9}{'disk':>9}{'disk/ring':>11}")
    for size in sizes:
        with tempfile.TemporaryDirectory(prefix="spikewatch-deep-") as tmp:
            r = measure(size, Path(tmp), rounds=max(3, size.rounds))
        print(f"{size.name:<7}{r['params']:>12,}{r['ring_ms']:>9.1f}{r['disk_ms']:>9.1f}"
              f"{r['ratio']:>10.1f}x")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
