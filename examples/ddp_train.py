"""Guarded data-parallel training under torchrun: a bad shard on one rank, rolled back on all.

Run it on two CPU processes (gloo)::

    torchrun --standalone --nproc_per_node=2 examples/ddp_train.py [--steps N]

The pattern to copy
-------------------
1. ``init_process_group(backend, timeout=...)`` with a *bounded* timeout: the guard's
   per-step collective then fails with ``PeerFailureError`` when a peer dies or stalls,
   instead of hanging the surviving ranks forever.
2. Wrap the model in ``DistributedDataParallel``, then build ``SpikeGuard`` as usual. It
   sees the process group and decides in lockstep: one all-gather of (loss, grad norm)
   per step, an identical monitor on every rank, the same skip / rollback / halt at the
   same step everywhere; only rank 0 logs.
3. Feed ``guard.batches`` the *global* batch positions: every rank walks the same
   sequence of global batches and keeps its own slice of each (what a
   ``DistributedSampler`` does). A rollback then skips the same global batches on
   every rank, so the ranks stay in step and their parameters stay bit-identical.
4. Per step, every rank calls ``guard.step(loss=local_loss, grad_norm=...)``.
5. Catch ``PeerFailureError`` around the loop: log it and exit non-zero, so that torchrun
   (or the job scheduler) restarts the job from its last checkpoint.

The demo: a small `TinyGPT` learns Python's standard-library docstrings. At ~70 % of
the run rank 1's shards turn bad for a range of global batches (labels shifted: a
corrupted shard). The mean loss the guard watches jumps and does not come back, the
guard rolls every rank back to a snapshot before the onset and skips those batches,
and the incident names rank 1. A clean, unguarded run of the same model gives the
reference loss.

Rank 0 prints one JSON line (``world_size``, ``rollbacks``, ``skipped_batches``,
``final_loss``, ``reference_loss``, ``params_identical_across_ranks``, ``incident_ranks``,
``steps``, ``snapshot_bytes``: the host bytes of rank 0's snapshots, about 1/world_size
of the state per slot, since DDP state is split across ranks); the exit code is 0 only
if the run is healthy: at least one rollback, bit-identical parameters on all ranks, and
a final held-out loss within ``--tolerance`` of the clean reference (1: unhealthy; 2: a
peer rank failed).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import re
import sys
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch.nn import functional
from torch.nn.parallel import DistributedDataParallel

from spikewatch.policy import PolicyConfig
from spikewatch.settings import MonitorConfig
from spikewatch_hooks.demo.corpus import CharCorpus, corpus_text
from spikewatch_hooks.demo.model import TinyGPT
from spikewatch_hooks.distributed.lockstep import PeerFailureError
from spikewatch_hooks.guard import SpikeGuard

Batch = tuple[torch.Tensor, torch.Tensor]
log = logging.getLogger("ddp_train")


@dataclass(frozen=True, kw_only=True)
class Settings:
    """Sizes of the example: about 10 s per run on two busy CPU cores."""

    steps: int = 300
    """Optimizer steps of each run (the guarded run counts steps on its final branch)."""
    batch_per_rank: int = 16
    """Sequences per rank per step; a global batch holds ``world_size`` times as many."""
    context: int = 32
    """Characters per sequence."""
    dim: int = 48
    """Model width."""
    layers: int = 2
    """Transformer blocks."""
    heads: int = 4
    """Attention heads."""
    lr: float = 3e-3
    """Peak learning rate (linear warm-up, then cosine decay)."""
    warmup: int = 30
    """Warm-up steps of the learning rate."""
    bad_rank: int = 1
    """The rank whose shards turn bad."""
    bad_fraction: float = 0.7
    """Where in the run the bad batches start (a fraction of ``steps``)."""
    bad_batches: int = 30
    """How many global batches in a row are bad on ``bad_rank``."""
    snapshot_every: int = 10
    """In-memory snapshots: often, for a short run (a real run keeps the default 100)."""
    seed: int = 0
    """Seeds the model's initial weights and the order of the batches."""

    @property
    def bad_positions(self) -> range:
        """The global batch positions that are bad on ``bad_rank``."""
        start = int(self.steps * self.bad_fraction)
        return range(start, start + self.bad_batches)

    def guard_config(self) -> MonitorConfig:
        """The policy sized to this short run: roll back 20 steps before the onset and
        skip as many batches ahead as the bad range is long (defaults: 100 and 100)."""
        return MonitorConfig(policy=PolicyConfig(margin=20, skip_ahead=self.bad_batches))


# -- data: every rank walks the same global batches and keeps its own slice -----------------
def global_batches(
    tokens: torch.Tensor, s: Settings, *, rank: int, world_size: int, poison: bool
) -> Iterator[Batch]:
    """An endless, seeded stream of this rank's shard of global batch 0, 1, 2, ...

    Every rank draws the same global batch (same seed) and keeps rows ``rank::world_size``,
    as ``DistributedSampler`` does; a guard rollback skips global positions, so every
    rank skips the same data.
    """
    g = torch.Generator().manual_seed(s.seed + 1)
    limit = int(len(tokens) * 0.9) - s.context - 1  # the last 10 % is held out
    vocab_size = int(tokens.max()) + 1
    position = 0
    while True:
        starts = torch.randint(0, limit, (s.batch_per_rank * world_size,), generator=g)
        x, y = windows(tokens, starts[rank::world_size], s.context)
        if poison and rank == s.bad_rank and position in s.bad_positions:
            y = (y + 7) % vocab_size  # a corrupted shard: the labels no longer fit
        position += 1
        yield x, y


def windows(tokens: torch.Tensor, starts: torch.Tensor, context: int) -> Batch:
    """Inputs and next-character targets of the sequences starting at ``starts``."""
    chunk = tokens[starts[:, None] + torch.arange(context + 1)[None, :]]
    return chunk[:, :-1], chunk[:, 1:]


def held_out_loss(model: TinyGPT, tokens: torch.Tensor, s: Settings, batches: int = 8) -> float:
    """Mean loss on the held-out last 10 % of the text (the same batches on every rank)."""
    g = torch.Generator().manual_seed(s.seed + 2)
    low, high = int(len(tokens) * 0.9), len(tokens) - s.context - 1
    with torch.no_grad():
        losses = [
            model.loss(*windows(tokens, torch.randint(low, high, (32,), generator=g), s.context))
            for _ in range(batches)
        ]
    return float(torch.stack(losses).mean())


# -- model and training ----------------------------------------------------------------------
def make_training(
    vocab_size: int, s: Settings
) -> tuple[DistributedDataParallel, torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """The same initial weights on every rank (seeded), wrapped in DDP; AdamW; the schedule."""
    torch.manual_seed(s.seed)
    net = TinyGPT(vocab_size, context=s.context, dim=s.dim, layers=s.layers, heads=s.heads)
    model = DistributedDataParallel(net)
    # The model's only buffer is a constant causal mask: skip DDP's per-step buffer
    # broadcast (set as an attribute: torch 2.13 renamed the keyword).
    model.broadcast_buffers = False
    opt = torch.optim.AdamW(model.parameters(), lr=s.lr, weight_decay=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_schedule(s))
    return model, opt, sched


def lr_schedule(s: Settings) -> Callable[[int], float]:
    """Linear warm-up to the peak, then cosine decay to zero at ``steps``."""

    def factor(step: int) -> float:
        warm = min(1.0, (step + 1) / s.warmup)
        return warm * 0.5 * (1.0 + math.cos(math.pi * min(step, s.steps) / s.steps))

    return factor


def forward_backward(
    model: DistributedDataParallel, batch: Batch
) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's loss and backward (DDP averages the gradients), then clip.

    Returns (loss, grad norm). Call the DDP wrapper, not ``model.module``: DDP prepares
    its gradient all-reduce in ``forward``.
    """
    x, y = batch
    logits = model(x)
    loss = functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
    loss.backward()  # type: ignore[no-untyped-call]
    return loss, torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)


def train_reference(tokens: torch.Tensor, vocab_size: int, s: Settings) -> float:
    """The clean, unguarded DDP run: its held-out loss is what a healthy run reaches."""
    model, opt, sched = make_training(vocab_size, s)
    rank, world = dist.get_rank(), dist.get_world_size()
    stream = global_batches(tokens, s, rank=rank, world_size=world, poison=False)
    for _ in range(s.steps):
        forward_backward(model, next(stream))
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
    return held_out_loss(model.module, tokens, s)


def train_guarded(
    tokens: torch.Tensor, vocab_size: int, s: Settings, monitor_url: str | None = None
) -> dict[str, Any]:
    """The same run on data with a bad range on one rank, watched by `SpikeGuard`
    (reporting to a `spikewatch serve` at ``monitor_url``: rank 0 talks to it)."""
    model, opt, sched = make_training(vocab_size, s)
    rank, world = dist.get_rank(), dist.get_world_size()
    guard = SpikeGuard(
        model=model,
        optimizer=opt,
        scheduler=sched,
        run_id="ddp-example",
        config=s.guard_config(),
        snapshot_every=s.snapshot_every,
        keep_snapshots=8,
        monitor_url=monitor_url,  # token: $SPIKEWATCH_TOKEN
    )  # a process group of > 1 rank is initialised: the guard decides in lockstep
    stream = global_batches(tokens, s, rank=rank, world_size=world, poison=True)
    for batch in guard.batches(stream):
        loss, grad_norm = forward_backward(model, batch)
        guard.step(loss=loss, grad_norm=grad_norm)  # optimizer.step(), unless skipped
        opt.zero_grad(set_to_none=True)
        if guard.step_count >= s.steps or guard.halted:
            break
    guard.close()  # every rank: the last steps are gathered, then rank 0 delivers them
    stats = guard.stats
    return {
        "world_size": world,
        "rollbacks": stats["rollbacks"],
        "skipped_batches": stats["skipped_batches"],
        "skip_ledger": stats["skip_ledger"],
        "halted": stats["halted"],
        "final_loss": held_out_loss(model.module, tokens, s),
        "params_identical_across_ranks": params_identical(model),
        "incident_ranks": ranks_named(stats["last_incident_ranks"], world),
        "incident": stats["last_incident_ranks"],
        "steps": guard.step_count,
        # DDP state is split across the ranks (snapshot_split=None, the default).
        "snapshot_bytes": stats["snapshot_bytes"],
    }


def service_view(url: str, run: str) -> dict[str, Any]:
    """What the service holds about the run: its status and incidents (rank 0 asks)."""
    views = {}
    for name, path in (("run", f"/v1/runs/{run}"), ("incidents", f"/v1/runs/{run}/incidents")):
        with urllib.request.urlopen(url.rstrip("/") + path, timeout=10) as answer:
            views[name] = json.loads(answer.read())
    run_view = views["run"]
    return {
        "records": run_view["records"],
        "last_step": run_view["last_step"],
        "rollbacks": run_view["rollbacks"],
        "decides": run_view["decides"],
        "incidents": [
            {"kind": i["kind"], "onset_step": i["onset_step"], "action": i["action"]}
            for i in views["incidents"]["incidents"]
        ],
    }


def params_identical(model: torch.nn.Module) -> bool:
    """True if every rank holds bit-identical parameters (all-gathers one flat vector)."""
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    gathered = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, flat)
    return all(torch.equal(gathered[0], other) for other in gathered[1:])


def ranks_named(attribution: str, world_size: int) -> list[int]:
    """The ranks that the guard's incident phrase names ("rank(s) [1] saw it ...").

    The guard reports the attribution as a phrase for people (``last_incident_ranks``
    in ``guard.stats``); this turns it into a list for the JSON line.
    """
    if attribution.startswith("all "):
        return list(range(world_size))
    found = re.match(r"rank\(s\) \[([\d, ]*)\]", attribution)
    return [int(r) for r in found.group(1).split(",")] if found else []


def healthy(result: dict[str, Any], tolerance: float) -> bool:
    """At least one rollback, identical parameters, the loss of a clean run (within tolerance)."""
    return (
        result["rollbacks"] >= 1
        and not result["halted"]
        and result["params_identical_across_ranks"]
        and math.isfinite(result["final_loss"])
        and result["final_loss"] <= result["reference_loss"] * (1.0 + tolerance)
    )


def parse_args(argv: Sequence[str] | None) -> tuple[Settings, argparse.Namespace]:
    """Command line: ``--steps``, the process group's ``--timeout``, the ``--tolerance``."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--steps", type=int, default=Settings.steps, help="steps per run")
    parser.add_argument(
        "--timeout", type=float, default=60.0, help="collective timeout, seconds (default 60)"
    )
    parser.add_argument(
        "--tolerance",
        type=float,
        default=0.05,
        help="healthy if the final loss is at most this fraction above the clean run's",
    )
    parser.add_argument(
        "--monitor-url",
        default=None,
        help="report to a `spikewatch serve` at this URL (token from $SPIKEWATCH_TOKEN)",
    )
    args = parser.parse_args(argv)
    if args.steps < 50:
        parser.error(f"--steps {args.steps}: use at least 50 (the detectors warm up first)")
    return Settings(steps=args.steps), args


def main(argv: Sequence[str] | None = None) -> int:
    """Train the clean reference and the guarded run; rank 0 prints the JSON line."""
    s, args = parse_args(argv)
    torch.set_num_threads(1)  # one thread per rank: the ranks share the host's cores
    # torchrun sets RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT: the env:// defaults.
    dist.init_process_group(backend="gloo", timeout=timedelta(seconds=args.timeout))
    rank = dist.get_rank()
    logging.basicConfig(level=logging.WARNING if rank == 0 else logging.ERROR)
    try:
        corpus = CharCorpus(corpus_text())
        reference = train_reference(corpus.tokens, corpus.vocab_size, s)
        result = train_guarded(corpus.tokens, corpus.vocab_size, s, args.monitor_url)
    except PeerFailureError as exc:  # a peer died or stalled: stop, don't hang
        log.error("rank %d: %s", rank, exc)
        return 2
    result["reference_loss"] = reference
    ok = healthy(result, args.tolerance)
    if rank == 0:
        if args.monitor_url:
            result["service"] = service_view(args.monitor_url, "ddp-example")
        print(json.dumps({**result, "healthy": ok}), flush=True)
    dist.barrier()  # every rank done before the group goes
    dist.destroy_process_group()
    return 0 if ok else 1


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    # Skip the interpreter's teardown: with torch 2.13's gloo backend it sometimes aborts
    # the process ("terminate called without an active exception") after a clean run.
    os._exit(code)
