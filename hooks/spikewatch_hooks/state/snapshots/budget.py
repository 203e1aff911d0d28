"""The host-memory budget of the snapshot ring: refuse a budget too small for one slot.

Before the first optimizer step an optimizer has no state yet, so the size of a slot
is estimated: the tensors there are now, plus, for every trainable parameter with no
state yet, its size times the state tensors its optimizer keeps per parameter (Adam
and relatives: 2; SGD with momentum, RMSprop, Adagrad: 1; SGD without momentum: 0;
any other optimizer: 2). The ring measures the real slots as it takes them and keeps
fewer of them when they outgrow the budget (logged once).

Example:
    >>> import torch
    >>> model = torch.nn.Linear(10, 10)  # 110 float32 parameters: 440 bytes
    >>> opt = torch.optim.AdamW(model.parameters())
    >>> slot_estimate(440, [opt], split_world=1)  # weights + exp_avg + exp_avg_sq
    1320
    >>> slots_within(budget=3000, keep=4, slot_bytes=1320)
    2
    >>> slots_within(budget=1000, keep=4, slot_bytes=1320)
    Traceback (most recent call last):
    ...
    spikewatch_hooks.state.snapshots.plan.SnapshotError: snapshot_budget_bytes=1000 is \
too small for one snapshot (1,320 bytes per slot on this rank); raise it to at least \
1320 (keep_snapshots=4 needs 5,280), or leave it None for no cap
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from spikewatch_hooks.state.snapshots.plan import SnapshotError, local

#: State tensors the size of its parameter that an optimizer keeps, by class name.
_STATE_PER_PARAM = {
    "Adam": 2, "AdamW": 2, "NAdam": 2, "RAdam": 2, "Adamax": 2, "Adadelta": 2,
    "Rprop": 2, "ASGD": 1, "Adagrad": 1, "SparseAdam": 2,
}  # fmt: skip


def state_per_param(opt: torch.optim.Optimizer) -> int:
    """How many parameter-sized state tensors ``opt`` will keep (an estimate)."""
    name = type(opt).__name__
    if name == "SGD":
        return int(any(g.get("momentum", 0) for g in opt.param_groups))
    if name == "RMSprop":
        extra = any(g.get("momentum", 0) for g in opt.param_groups)
        centered = any(g.get("centered", False) for g in opt.param_groups)
        return 1 + int(extra) + int(centered)
    return _STATE_PER_PARAM.get(name, 2)


def slot_estimate(
    held_bytes: int, optimizers: Sequence[torch.optim.Optimizer], *, split_world: int
) -> int:
    """Bytes of one slot on this rank once every optimizer has its state.

    Args:
        held_bytes: bytes this rank's slot holds for the tensors there are now.
        optimizers: the optimizers whose missing state is estimated.
        split_world: the ranks the replicated state is split over (1: not split).
    """
    missing = 0
    for opt in optimizers:
        per = state_per_param(opt)
        for group in opt.param_groups:
            for p in group["params"]:
                if p.requires_grad and not opt.state.get(p):
                    t = local(p)
                    missing += per * t.numel() * t.element_size()
    return held_bytes + -(-missing // split_world)


def slots_within(*, budget: int | None, keep: int, slot_bytes: int) -> int:
    """How many of the ``keep`` slots fit in ``budget``; a `SnapshotError` if none does."""
    if budget is None or slot_bytes == 0:
        return keep
    if budget < slot_bytes:
        raise SnapshotError(
            f"snapshot_budget_bytes={budget} is too small for one snapshot "
            f"({slot_bytes:,} bytes per slot on this rank); raise it to at least "
            f"{slot_bytes} (keep_snapshots={keep} needs {keep * slot_bytes:,}), "
            "or leave it None for no cap"
        )
    return min(keep, budget // slot_bytes)
