"""Whether a ring splits replicated state across ranks, and which entries it splits.

The default (``split=None``) splits when the state is known to be replicated: the model
is wrapped in ``DistributedDataParallel`` and the process group has more than one rank.
A plain module in a multi-rank lockstep is not assumed replicated (pipeline stages,
or ranks training different models, hold different state): pass ``split=True`` for it.
FSDP2 (DTensor) state is already sharded, so each rank keeps its own shards and there
is nothing to split; ``split=True`` with it is refused. 0-dim tensors (Adam's ``step``)
stay whole on every rank: a few bytes, and often on another device than the rest.

Example:
    >>> import torch
    >>> from spikewatch_hooks.state.snapshots.plan import plan
    >>> layout = plan({("model", "w"): torch.ones(4), ("optim", 0, 0, "step"): torch.tensor(1.0)})
    >>> wants_split(None, torch.nn.Linear(1, 1), layout, None)  # no process group
    False
    >>> whole, parts = split_entries(layout, True)
    >>> [e.key for e in whole], [e.key for e in parts]
    ([('optim', 0, 0, 'step')], [('model', 'w')])
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

from spikewatch_hooks.state.snapshots.plan import Entry, Layout, SnapshotError


def wants_split(
    split: bool | None, model: nn.Module, layout: Layout, group: dist.ProcessGroup | None
) -> bool:
    """Whether to split ``layout`` across the ranks of ``group`` (see the module doc)."""
    world = dist.get_world_size(group) if dist.is_available() and dist.is_initialized() else 1
    if layout.sharded:
        if split:
            raise SnapshotError(
                "snapshot_split=True is invalid for FSDP2 (DTensor) state: each rank "
                "already keeps only its own shards; leave snapshot_split=None"
            )
        return False
    if split is None:
        return world > 1 and isinstance(model, DistributedDataParallel)
    return bool(split) and world > 1


def split_entries(layout: Layout, split: bool) -> tuple[list[Entry], list[Entry]]:
    """The entries kept whole on every rank, and those split across ranks."""
    if not split:
        return list(layout.entries), []
    whole = [e for e in layout.entries if len(e.shape) == 0]
    parts = [e for e in layout.entries if len(e.shape) > 0]
    return whole, parts


def blank(entry: Entry) -> torch.Tensor:
    """A new (uninitialised) live tensor for ``entry``: a DTensor for a DTensor entry,
    so a restored optimizer state has the placement the optimizer gave it."""
    part = torch.empty(entry.shape, dtype=entry.dtype, device=entry.device)
    spec = entry.spec
    if spec is None:
        return part
    return DTensor.from_local(
        part, spec.mesh, spec.placements, run_check=False, shape=spec.shape, stride=spec.stride
    )
