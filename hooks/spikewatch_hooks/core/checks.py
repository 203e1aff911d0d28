"""Construction-time checks shared by every hook: wrong use fails at once, with the fix."""

from __future__ import annotations

import os

import torch
from torch import nn

from spikewatch.errors import bad_value


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
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise bad_value(
            "optimizer",
            type(optimizer).__name__,
            "pass the torch.optim.Optimizer that updates the model",
        )
    if scheduler is not None and not (
        callable(getattr(scheduler, "step", None))
        and callable(getattr(scheduler, "state_dict", None))
        and not isinstance(scheduler, torch.optim.Optimizer)
    ):
        raise bad_value(
            "scheduler",
            type(scheduler).__name__,
            "pass a torch.optim.lr_scheduler object (or None)",
        )
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
