"""Construction-time checks shared by every hook: wrong use fails at once, with the fix."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

import torch
from torch import nn

from spikewatch.errors import bad_value

log = logging.getLogger("spikewatch_hooks")


def check_components(
    *,
    model: object,
    optimizer: object,
    scheduler: object,
    snapshot_every: object,
    keep_snapshots: object,
    checkpoint_every: object,
    checkpoint_dir: object,
) -> None:
    """Fail at construction, with the fix, on wrong use."""
    if not isinstance(model, nn.Module):
        raise bad_value("model", type(model).__name__, "pass the torch.nn.Module being trained")
    check_updaters(optimizer, scheduler)
    for name, value in (("snapshot_every", snapshot_every), ("keep_snapshots", keep_snapshots)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise bad_value(name, value, "use an integer >= 1")
    if (
        isinstance(checkpoint_every, bool)
        or not isinstance(checkpoint_every, int)
        or checkpoint_every < 0
    ):
        raise bad_value("checkpoint_every", checkpoint_every, "use an integer >= 0 (0: never)")
    if checkpoint_every and checkpoint_dir is None:
        raise bad_value("checkpoint_dir", None, "set a folder when checkpoint_every > 0")
    if checkpoint_dir is not None and not isinstance(checkpoint_dir, (str, os.PathLike)):
        raise bad_value("checkpoint_dir", checkpoint_dir, "use a path")


def check_snapshot_options(
    *, snapshot_split: object, snapshot_budget_bytes: object, snapshot_frozen: object
) -> None:
    """Fail at construction, with the fix, on a snapshot layout option of the wrong kind.

    Example:
        >>> check_snapshot_options(snapshot_split=None, snapshot_budget_bytes=0,
        ...                        snapshot_frozen=False)
        Traceback (most recent call last):
        ...
        spikewatch.errors.ConfigError: snapshot_budget_bytes=0 is invalid: use an integer \
number of bytes >= 1, or None for no cap
    """
    if snapshot_split is not None and not isinstance(snapshot_split, bool):
        raise bad_value(
            "snapshot_split", snapshot_split,
            "use None (split DDP state across ranks), False (full copies) or True",
        )  # fmt: skip
    if snapshot_budget_bytes is not None and (
        isinstance(snapshot_budget_bytes, bool)
        or not isinstance(snapshot_budget_bytes, int)
        or snapshot_budget_bytes < 1
    ):
        raise bad_value(
            "snapshot_budget_bytes", snapshot_budget_bytes,
            "use an integer number of bytes >= 1, or None for no cap",
        )  # fmt: skip
    if not isinstance(snapshot_frozen, bool):
        raise bad_value("snapshot_frozen", snapshot_frozen, "use True or False")


def check_updaters(optimizer: object, scheduler: object, scaler: object = None) -> None:
    """One optimizer or a non-empty list/tuple of them; None, one scheduler or a list of
    them; a GradScaler-like object (``scale``/``unscale_``/``step``/``update``) or None.

    Example:
        >>> model = nn.Linear(2, 1)
        >>> check_updaters([torch.optim.SGD(model.parameters(), lr=0.1)], None)
        >>> check_updaters([], None)
        Traceback (most recent call last):
        ...
        spikewatch.errors.ConfigError: optimizer=[] is invalid: pass the torch.optim.Optimizer ...
    """
    optimizers = list(optimizer) if isinstance(optimizer, (list, tuple)) else [optimizer]
    bad = [o for o in optimizers if not isinstance(o, torch.optim.Optimizer)]
    if not optimizers or bad:
        raise bad_value(
            "optimizer",
            optimizer if not optimizers else type(bad[0]).__name__,
            "pass the torch.optim.Optimizer that updates the model, or a list of them",
        )
    schedulers = list(scheduler) if isinstance(scheduler, (list, tuple)) else [scheduler]
    for one in schedulers:
        if one is not None and not (
            callable(getattr(one, "step", None))
            and callable(getattr(one, "state_dict", None))
            and not isinstance(one, torch.optim.Optimizer)
        ):
            raise bad_value(
                "scheduler",
                type(one).__name__,
                "pass a torch.optim.lr_scheduler object, a list of them, or None",
            )
    needed = ("scale", "unscale_", "step", "update", "state_dict", "load_state_dict")
    if scaler is not None and not all(callable(getattr(scaler, n, None)) for n in needed):
        raise bad_value("scaler", type(scaler).__name__, "pass a torch.amp.GradScaler, or None")


def warn_uncovered(
    model: nn.Module, optimizer: torch.optim.Optimizer | Sequence[torch.optim.Optimizer]
) -> int:
    """Warn when trainable parameters of ``model`` are in none of the optimizers given
    (a second optimizer left out would be stepped by the user but never snapshotted);
    return how many there are.

    Example:
        >>> model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 1))
        >>> warn_uncovered(model, torch.optim.SGD(model[0].parameters(), lr=0.1))
        2
    """
    optimizers = [optimizer] if isinstance(optimizer, torch.optim.Optimizer) else list(optimizer)
    covered = {id(p) for o in optimizers for g in o.param_groups for p in g["params"]}
    left = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in covered]
    if left:
        log.warning(
            "spikewatch: %d trainable parameter(s) of the model are in no optimizer given "
            "to the guard (%s%s): their optimizer is neither snapshotted nor restored; pass "
            "every optimizer (optimizer=[o1, o2]), or set requires_grad=False on frozen ones",
            len(left),
            ", ".join(left[:3]),
            ", ..." if len(left) > 3 else "",
        )
    return len(left)
