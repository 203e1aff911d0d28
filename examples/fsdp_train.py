"""Guarded FSDP2 training under torchrun: a sharded model, a bad range, one rollback.

Run it on two CPU processes (gloo)::

    torchrun --standalone --nproc_per_node=2 examples/fsdp_train.py [--steps N]
    # save a DCP checkpoint at step S of the guarded run, then resume it (any world size):
    torchrun --standalone --nproc_per_node=2 examples/fsdp_train.py --save-at S --checkpoint D
    torchrun --standalone --nproc_per_node=1 examples/fsdp_train.py --resume D

The pattern to copy
-------------------
1. ``fully_shard`` every block, then the root (FSDP2: parameters become DTensors and
   each rank holds its shard); build the optimizer on the sharded parameters.
2. Build ``SpikeGuard`` as usual. Its snapshot ring keeps each rank's *local shards* of
   parameters and optimizer state in host buffers (``guard.stats["snapshot_bytes"]``:
   about 1/world_size of the model's state per slot) and restores them in place.
3. Pass ``clip_grad_norm_``'s result straight to ``guard.step`` (a replicated DTensor:
   the same norm on every rank, so every rank decides alike, in lockstep).
4. ``probe_loss=`` turns on forensics: after a rollback every rank re-evaluates its
   shard of the suspect batches forward only (the ranks agree on which, so the sharded
   forward runs the same number of times everywhere) and they reach one verdict.
5. ``guard.save_checkpoint(folder)`` writes a sharded DCP checkpoint (every rank at the
   same step); ``guard.resume(folder)`` loads it on any world size, skip ledger included.

The demo: three runs of a small `TinyGPT` from the same initial weights: a clean one,
one on data with a bad range of labels (both ranks' shards, late in the run, when the
learning rate is low and the damage stays), unguarded, and the same guarded. Rank 0
prints one JSON line (``world_size``, ``rollbacks``, ``clean_final_loss``,
``unguarded_final_loss``, ``guarded_final_loss``, ``snapshot_bytes``, ``verdict``, ...). With
``--resume`` only the guarded run is trained, from the checkpoint to ``--steps``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard

from spikewatch.policy import PolicyConfig
from spikewatch.settings import MonitorConfig
from spikewatch_hooks.demo.corpus import CharCorpus, corpus_text
from spikewatch_hooks.demo.model import TinyGPT
from spikewatch_hooks.demo.scenario import sample_loss
from spikewatch_hooks.guard import SpikeGuard

Batch = tuple[torch.Tensor, torch.Tensor]
log = logging.getLogger("fsdp_train")


@dataclass(frozen=True, kw_only=True)
class Settings:
    """Sizes of the example: a few seconds per run on two busy CPU cores."""

    steps: int = 150
    """Optimizer steps of each run (the guarded run counts steps on its final branch)."""
    batch: int = 32
    """Sequences per global batch; each rank trains on its 1/world_size rows."""
    context: int = 32
    """Characters per sequence."""
    dim: int = 48
    """Model width."""
    layers: int = 2
    """Transformer blocks (each its own FSDP2 unit)."""
    lr: float = 3e-3
    """Peak learning rate (linear warm-up over 20 steps, then cosine decay)."""
    bad_start: int = 105
    """First global batch position of the bad range."""
    bad_batches: int = 25
    """How many global batches in a row are bad (random labels: a corrupted range)."""
    snapshot_every: int = 10
    """In-memory snapshots: often, for a short run."""
    seed: int = 0
    """Seeds the initial weights and the order of the batches."""

    def guard_config(self) -> MonitorConfig:
        """Roll back 20 steps before the onset, skip as many batches as the bad range."""
        return MonitorConfig(policy=PolicyConfig(margin=20, skip_ahead=self.bad_batches))


def batches(tokens: torch.Tensor, s: Settings, *, poison: bool) -> Iterator[Batch]:
    """This rank's rows of global batch 0, 1, 2, ... (seeded: the same on every run)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    g = torch.Generator().manual_seed(s.seed + 1)
    limit = int(len(tokens) * 0.9) - s.context - 1  # the last 10 % is held out
    vocab = int(tokens.max()) + 1
    position = 0
    while True:
        starts = torch.randint(0, limit, (s.batch,), generator=g)
        noise = torch.randint(0, vocab, (s.batch, s.context), generator=g)
        x, y = windows(tokens, starts[rank::world], s.context)
        if poison and s.bad_start <= position < s.bad_start + s.bad_batches:
            y = noise[rank::world]  # a corrupted range: labels unrelated to the text
        position += 1
        yield x, y


def windows(tokens: torch.Tensor, starts: torch.Tensor, context: int) -> Batch:
    """Inputs and next-character targets of the sequences starting at ``starts``."""
    chunk = tokens[starts[:, None] + torch.arange(context + 1)[None, :]]
    return chunk[:, :-1], chunk[:, 1:]


def held_out_loss(model: TinyGPT, tokens: torch.Tensor, s: Settings) -> float:
    """Mean loss on the held-out last 10 % (the same batches on every rank)."""
    g = torch.Generator().manual_seed(s.seed + 2)
    low, high = int(len(tokens) * 0.9), len(tokens) - s.context - 1
    with torch.no_grad():
        losses = [
            model.loss(*windows(tokens, torch.randint(low, high, (32,), generator=g), s.context))
            for _ in range(8)
        ]
    return float(torch.stack(losses).mean())


def make_training(
    vocab: int, s: Settings
) -> tuple[TinyGPT, torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """The same initial weights on every rank, sharded with ``fully_shard``; AdamW."""
    torch.manual_seed(s.seed)
    model = TinyGPT(vocab, context=s.context, dim=s.dim, layers=s.layers, heads=4)
    for block in model.blocks:
        fully_shard(block)
    fully_shard(model)
    opt = torch.optim.AdamW(model.parameters(), lr=s.lr, weight_decay=0.1)

    def factor(step: int) -> float:
        warm = min(1.0, (step + 1) / 20)
        return warm * 0.5 * (1.0 + math.cos(math.pi * min(step, s.steps) / s.steps))

    return model, opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)


def forward_backward(model: TinyGPT, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's loss and backward (FSDP2 reduce-scatters the gradients), then clip."""
    loss = model.loss(*batch)
    loss.backward()  # type: ignore[no-untyped-call]
    return loss, torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)


def train_unguarded(tokens: torch.Tensor, vocab: int, s: Settings, *, poison: bool) -> float:
    """A plain sharded run (clean, or on the bad data); its held-out loss."""
    model, opt, sched = make_training(vocab, s)
    stream = batches(tokens, s, poison=poison)
    for _ in range(s.steps):
        forward_backward(model, next(stream))
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
    return held_out_loss(model, tokens, s)


def train_guarded(
    tokens: torch.Tensor, vocab: int, s: Settings, args: argparse.Namespace
) -> dict[str, Any]:
    """The bad-data run watched by `SpikeGuard`; checkpoint or resume as asked."""
    model, opt, sched = make_training(vocab, s)
    guard = SpikeGuard(
        model=model, optimizer=opt, scheduler=sched, run_id="fsdp-example",
        config=s.guard_config(), snapshot_every=s.snapshot_every, keep_snapshots=8,
        probe_loss=sample_loss,  # forensics: every rank probes its shard after a rollback
    )  # fmt: skip
    if args.resume:
        guard.resume(args.resume)
    trained: list[int] = []
    for batch in guard.batches(batches(tokens, s, poison=True)):
        loss, grad_norm = forward_backward(model, batch)
        trained.append(guard.engine.position)
        guard.step(loss=loss, grad_norm=grad_norm)  # optimizer.step(), unless skipped
        opt.zero_grad(set_to_none=True)
        if args.save_at and guard.step_count == args.save_at:
            guard.save_checkpoint(args.checkpoint)
        if guard.step_count >= s.steps or guard.halted:
            break
    guard.close()
    stats = guard.stats
    return {
        "rollbacks": stats["rollbacks"],
        "halted": stats["halted"],
        "skip_ledger": stats["skip_ledger"],
        "snapshot_bytes": stats["snapshot_bytes"],
        "verdict": (stats["last_verdict"] or {}).get("cause"),
        "guarded_final_loss": held_out_loss(model, tokens, s),
        "steps": guard.step_count,
        "trained_positions": trained,
    }


def parse_args(argv: Sequence[str] | None) -> tuple[Settings, argparse.Namespace]:
    """``--steps``, ``--timeout``, ``--save-at``/``--checkpoint``, ``--resume``."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--steps", type=int, default=Settings.steps, help="steps per run")
    parser.add_argument("--timeout", type=float, default=60.0, help="collective timeout, s")
    parser.add_argument("--save-at", type=int, default=0, help="guarded run: save at this step")
    parser.add_argument("--checkpoint", default=None, help="folder for --save-at")
    parser.add_argument("--resume", default=None, help="resume the guarded run from a folder")
    args = parser.parse_args(argv)
    if args.save_at and not args.checkpoint:
        parser.error("--save-at needs --checkpoint FOLDER")
    return Settings(steps=args.steps), args


def main(argv: Sequence[str] | None = None) -> int:
    """Train the runs; rank 0 prints the JSON line."""
    s, args = parse_args(argv)
    torch.set_num_threads(1)  # one thread per rank: the ranks share the host's cores
    dist.init_process_group(backend="gloo", timeout=timedelta(seconds=args.timeout))
    logging.basicConfig(level=logging.WARNING if dist.get_rank() == 0 else logging.ERROR)
    corpus = CharCorpus(corpus_text())
    result: dict[str, Any] = {"world_size": dist.get_world_size()}
    if not args.resume:
        result["clean_final_loss"] = train_unguarded(
            corpus.tokens, corpus.vocab_size, s, poison=False
        )
        result["unguarded_final_loss"] = train_unguarded(
            corpus.tokens, corpus.vocab_size, s, poison=True
        )
    result.update(train_guarded(corpus.tokens, corpus.vocab_size, s, args))
    if dist.get_rank() == 0:
        print(json.dumps(result), flush=True)
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # gloo's threads sometimes abort an interpreter teardown
