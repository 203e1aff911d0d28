"""Guarded training with Hugging Face ``accelerate`` and gradient accumulation of 4.

Run it on the CPU::

    python examples/accelerate_train.py [--steps 150] [--accumulate 4]

The pattern to copy
-------------------
1. ``accelerator.prepare`` the model, optimizer, dataloader and scheduler, then build
   ``SpikeGuard`` on the *prepared* optimizer and scheduler.
2. Iterate ``guard.batches(loader)``: the guard numbers every micro-batch the loader
   yields (data positions) and passes over the ones in its skip ledger without loading
   them into the model.
3. Inside ``with accelerator.accumulate(model):`` run forward and backward as usual, and
   call ``guard.step`` only when ``accelerator.sync_gradients`` is True: that is the
   optimizer step. ``guard.step`` runs ``optimizer.step()`` and ``scheduler.step()``
   (do not call them yourself) unless it skips the update or rolls back. Pass the mean
   loss of the accumulated micro-batches and the pre-clip norm from
   ``accelerator.clip_grad_norm_``.

Units: ``step_count``, ``margin``, ``snapshot_every`` and ``skip_ahead`` count optimizer
steps (150 here, not 600 micro-batches); data positions and ``skipped_batches`` count
micro-batches. (A ``guard.step`` on a micro-batch that does not sync is not an optimizer
step: the guard ignores it, so calling it every micro-batch is safe too.)

The demo: a small MLP learns a 10-way classification whose labels a fixed random
teacher samples. At 80 % of the run a range of micro-batches has its labels shifted (a
corrupted shard), ``--poison-steps`` optimizer steps' worth. It prints one JSON line:
the held-out loss of a clean run, of the poisoned run without the guard and with it,
and the guard's counters; the exit code is 0 only when the guarded run ends within
``--tolerance`` of the clean one.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from accelerate import Accelerator  # type: ignore[import-untyped]
from torch import nn
from torch.nn import functional
from torch.utils.data import DataLoader, TensorDataset

from spikewatch.policy import PolicyConfig
from spikewatch.settings import MonitorConfig
from spikewatch_hooks import SpikeGuard

FEATURES, HIDDEN, CLASSES, MICRO_BATCH = 32, 64, 10, 64
PEAK_LR, WARMUP, LR_FLOOR = 3e-2, 20, 0.1


@dataclass
class Result:
    """One run: held-out loss and, when guarded, the guard's counters."""

    held_out_loss: float
    optimizer_steps: int
    guard: dict[str, Any] = field(default_factory=dict)
    #: forward passes on micro-batches already in the skip ledger (wasted compute)
    ledger_forwards: int = 0


def make_data(batches: int, *, seed: int = 2, poison: range = range(0)) -> TensorDataset:
    """Seeded inputs, labels from a fixed teacher; ``poison``: micro-batch positions whose
    labels are shifted."""
    teacher = torch.randn(FEATURES, CLASSES, generator=torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batches * MICRO_BATCH, FEATURES, generator=g)
    probs = torch.softmax(x @ teacher * (8 / math.sqrt(FEATURES)), dim=1)
    y = torch.multinomial(probs, 1, generator=g).squeeze(1)
    bad = slice(poison.start * MICRO_BATCH, poison.stop * MICRO_BATCH)
    y[bad] = (y[bad] + 3) % CLASSES
    return TensorDataset(x, y)


def _schedule(steps: int) -> Any:
    def factor(step: int) -> float:
        cosine = 0.5 * (1.0 + math.cos(math.pi * min(step, steps) / steps))
        return min(1.0, (step + 1) / WARMUP) * (LR_FLOOR + (1.0 - LR_FLOOR) * cosine)

    return factor


def held_out_loss(model: nn.Module) -> float:
    """Mean loss on clean data the run never saw."""
    x, y = make_data(128, seed=99).tensors
    with torch.no_grad():
        return float(functional.cross_entropy(model(x), y))


def train(
    data: TensorDataset,
    *,
    steps: int,
    accumulate: int,
    guarded: bool,
    every_micro_batch: bool = False,
) -> Result:
    """``steps`` optimizer steps of ``accumulate`` micro-batches each.

    ``every_micro_batch``: call ``guard.step`` on every micro-batch (the guard ignores
    the ones that do not sync) instead of only when ``sync_gradients``.
    """
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=accumulate)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(FEATURES, HIDDEN), nn.GELU(), nn.Linear(HIDDEN, CLASSES))
    opt = torch.optim.AdamW(model.parameters(), lr=PEAK_LR, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _schedule(steps))
    loader = DataLoader(data, batch_size=MICRO_BATCH, shuffle=False)
    model, opt, loader, sched = accelerator.prepare(model, opt, loader, sched)
    guard = None
    if guarded:  # the policy sized to this short run (real runs keep the defaults)
        config = MonitorConfig(policy=PolicyConfig(margin=20, skip_ahead=20))
        guard = SpikeGuard(model, opt, sched, config=config, snapshot_every=10, keep_snapshots=8)
    result = Result(held_out_loss=math.nan, optimizer_steps=0)
    total = torch.zeros(())
    for x, y in guard.batches(loader) if guard is not None else loader:
        if guard is not None:
            result.ledger_forwards += guard.engine.position in guard.ledger
        with accelerator.accumulate(model):
            loss = functional.cross_entropy(model(x), y)
            accelerator.backward(loss)
            total = total + loss.detach() / accumulate
            if guard is not None and every_micro_batch and not accelerator.sync_gradients:
                guard.step(loss=loss)  # not an optimizer step: the guard ignores it
            if accelerator.sync_gradients:
                grad_norm = accelerator.clip_grad_norm_(model.parameters(), 1.0)
                if guard is not None:
                    guard.step(loss=total, grad_norm=grad_norm)  # steps opt and sched
                else:
                    opt.step()
                    sched.step()
                total = torch.zeros(())
                result.optimizer_steps += 1
            opt.zero_grad()
        if (guard.step_count if guard is not None else result.optimizer_steps) >= steps:
            break
    result.held_out_loss = held_out_loss(accelerator.unwrap_model(model))
    if guard is not None:
        stats = guard.stats
        result.guard = {
            "step_count": guard.step_count,
            "rollbacks": stats["rollbacks"],
            "skipped_batches": stats["skipped_batches"],
            "skip_ledger": stats["skip_ledger"],
        }
    return result


def main(argv: list[str] | None = None) -> int:
    """Clean, poisoned and guarded runs; one JSON line; exit 0 when the guard recovered."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=150, help="optimizer steps")
    parser.add_argument("--accumulate", type=int, default=4, help="micro-batches per step")
    parser.add_argument("--poison-steps", type=int, default=20, help="optimizer steps of bad data")
    parser.add_argument("--tolerance", type=float, default=0.05)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # tiny matrices: more threads only contend on a small host
    batches = args.steps * args.accumulate
    start = int(0.8 * batches) // args.accumulate * args.accumulate
    poison = range(start, start + args.poison_steps * args.accumulate)
    data_batches = 2 * batches  # headroom for the micro-batches a rollback passes over
    run: dict[str, Any] = {"steps": args.steps, "accumulate": args.accumulate}
    clean = train(make_data(data_batches), steps=args.steps, accumulate=args.accumulate,
                  guarded=False)  # fmt: skip
    poisoned = make_data(data_batches, poison=poison)
    unguarded = train(poisoned, steps=args.steps, accumulate=args.accumulate, guarded=False)
    guarded = train(poisoned, steps=args.steps, accumulate=args.accumulate, guarded=True)
    run.update(
        poison=[poison.start, poison.stop],
        clean=clean.held_out_loss,
        unguarded=unguarded.held_out_loss,
        guarded=asdict(guarded),
    )
    healthy = (
        abs(guarded.held_out_loss - clean.held_out_loss) <= args.tolerance * clean.held_out_loss
    )
    run["healthy"] = healthy
    print(json.dumps(run))
    return 0 if healthy else 1


if __name__ == "__main__":
    sys.exit(main())
