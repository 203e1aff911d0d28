"""The live objects of a running ``Trainer``: the Trainer itself, model, optimizer, scheduler."""

from __future__ import annotations

import sys
from typing import Any, cast

import torch
from torch import nn
from transformers import Trainer

from spikewatch.errors import SpikewatchError, bad_value


def calling_trainer() -> Trainer:
    """The Trainer whose ``train()`` is running on this thread (found on the call stack).

    A callback event carries the model and optimizer but not the Trainer, whose per-step
    loss and grad norm the guard needs; ``on_train_begin`` is called from the Trainer's
    own training loop, so the Trainer is the ``self`` of a frame above.
    """
    frame = sys._getframe(1)
    while frame is not None:
        candidate = frame.f_locals.get("self")
        if isinstance(candidate, Trainer):
            return candidate
        frame = frame.f_back  # type: ignore[assignment]
    raise SpikewatchError(
        "SpikewatchCallback found no transformers.Trainer calling it: call "
        "callback.attach(trainer) before trainer.train()"
    )


def live_objects(kwargs: dict[str, Any]) -> tuple[nn.Module, torch.optim.Optimizer, Any]:
    """The model, optimizer and scheduler a callback event carries, unwrapped from accelerate."""
    optimizer, scheduler = kwargs.get("optimizer"), kwargs.get("lr_scheduler")
    if optimizer is None:
        raise bad_value(
            "optimizer",
            None,
            "the Trainer passed no optimizer: start training with trainer.train()",
        )
    if getattr(optimizer, "scaler", None) is not None:
        raise bad_value(
            "fp16", True, "use bf16=True: skipping an update under a GradScaler is not supported"
        )
    # accelerate hands over AcceleratedOptimizer / AcceleratedScheduler wrappers; the
    # snapshots must hold (and restore into) the torch objects inside them.
    optimizer = getattr(optimizer, "optimizer", optimizer)
    scheduler = getattr(scheduler, "scheduler", scheduler)
    model = cast(nn.Module, kwargs.get("model"))  # check_components checks all three
    return model, optimizer, scheduler


def loader_length(loader: Any) -> int | None:
    """``len(loader)``, or None for a loader without one (an IterableDataset's)."""
    try:
        return len(loader)
    except TypeError:  # an IterableDataset's loader has no length
        return None
