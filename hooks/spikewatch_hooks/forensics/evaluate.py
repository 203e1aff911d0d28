"""Forward passes that change nothing: the probe's evaluation of cached batches.

Inside `untouched` the model is in eval mode under ``torch.no_grad()`` and every
module's own training flag, and every random generator (`state.rng`), is put back
afterwards, so the model, optimizer, RNG and data order after a probe are exactly
those of a run without it. Under torch.distributed every rank evaluates the same
positions (its own shard of each batch) the same number of times: a sharded model's
forward is a collective, so a rank that stopped early would hang the others.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from spikewatch.forensics.judge import BatchLoss
from spikewatch_hooks.distributed.lockstep import Lockstep
from spikewatch_hooks.forensics.cache import CachedBatch
from spikewatch_hooks.state.rng import rng_state, set_rng_state

#: ``probe_loss(model, batch)``: the batch's loss, one value per sample (shape [B]) or
#: one for the batch (a scalar); computed the same way as in training.
ProbeLoss = Callable[[nn.Module, Any], torch.Tensor]


@contextmanager
def untouched(model: nn.Module) -> Iterator[None]:
    """Eval mode, no autograd, and the training flags and RNG states put back after."""
    modes = [(m, m.training) for m in model.modules()]
    rng = rng_state()
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for module, training in modes:
            module.training = training  # not .train(): that would set children too
        set_rng_state(rng)


def evaluate(
    model: nn.Module,
    loss_fn: ProbeLoss,
    entries: Sequence[CachedBatch],
    *,
    deadline: float,
    lockstep: Lockstep | None,
) -> list[BatchLoss]:
    """The loss of each entry, in order, until ``deadline`` (``time.monotonic``).

    Under a lockstep the ranks agree before each forward whether to go on (any rank
    past the deadline, or whose ``loss_fn`` raised, stops them all together). A
    ``loss_fn`` that raised is re-raised here (`ProbeFailedError`) after the ranks stopped.
    """
    out: list[BatchLoss] = []
    failure: Exception | None = None
    with untouched(model):
        for entry in entries:
            stop = time.monotonic() > deadline or failure is not None
            if lockstep is not None:
                votes: list[bool] = [False] * lockstep.world_size
                dist.all_gather_object(votes, stop, group=lockstep.group)
                stop = any(votes)
            if stop:
                break
            try:
                out.append(_one(loss_fn(model, entry.batch), entry))
            except Exception as exc:  # the user's loss function: fail open, say why
                failure = exc
    if failure is not None:
        raise ProbeFailedError(
            f"probe_loss raised {type(failure).__name__}: {failure}"
        ) from failure
    return out


class ProbeFailedError(RuntimeError):
    """The probe's loss function raised: the verdict is ``unknown`` and says so."""


def _one(value: torch.Tensor, entry: CachedBatch) -> BatchLoss:
    if not isinstance(value, torch.Tensor):
        value = torch.as_tensor(value)
    values = value.detach().float().reshape(-1).cpu().tolist()  # host read: a rare probe
    if value.dim() == 0 or len(values) == 1:
        return BatchLoss(entry.position, float(values[0]))
    indices: Sequence[int | None] = entry.indices or ()
    if len(indices) != len(values):
        indices = [None] * len(values)
    finite = [v for v in values if math.isfinite(v)]
    mean = sum(values) / len(values) if len(finite) == len(values) else math.inf
    return BatchLoss(entry.position, mean, list(zip(indices, values, strict=True)))


def agree_positions(positions: list[int], lockstep: Lockstep | None) -> list[int]:
    """The positions every rank holds (each rank caches its own shard of a batch)."""
    if lockstep is None:
        return positions
    everyone: list[list[int]] = [[] for _ in range(lockstep.world_size)]
    dist.all_gather_object(everyone, positions, group=lockstep.group)
    common = set.intersection(*(set(p) for p in everyone))
    return [p for p in positions if p in common]


def combine(losses: list[BatchLoss], lockstep: Lockstep | None) -> list[BatchLoss]:
    """Every rank's shards of each batch as one batch: mean loss, all samples."""
    if lockstep is None:
        return losses
    everyone: list[list[BatchLoss]] = [[] for _ in range(lockstep.world_size)]
    dist.all_gather_object(everyone, losses, group=lockstep.group)
    count = min(len(r) for r in everyone)  # equal, unless a rank's forward raised
    merged = []
    for i in range(count):
        shards = [r[i] for r in everyone]
        merged.append(
            BatchLoss(
                shards[0].position,
                sum(s.loss for s in shards) / len(shards),
                [sample for s in shards for sample in s.samples],
            )
        )
    return merged
