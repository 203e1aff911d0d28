"""A Lightning version of the classification task, whose batches carry their position.

Each sample carries the index of the loader batch it belongs to (no shuffling), so the
module can count forward passes on batches the guard's skip ledger already holds.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from torch.nn import functional
from torch.utils.data import DataLoader, TensorDataset

from classify_task import make_data, make_net, make_optimizer
from spikewatch_hooks.adapters.lightning import SpikewatchCallback


def numbered_data(batches: int, batch_size: int, *, poison: range = range(0)) -> TensorDataset:
    """`classify_task.make_data` plus each sample's batch position."""
    x, y = make_data(batches, batch_size, poison=poison).tensors
    return TensorDataset(x, y, torch.arange(batches * batch_size) // batch_size)


class Numbered(pl.LightningModule):
    """The MLP; counts forward passes, and those on positions in ``watch``'s ledger."""

    def __init__(self, *, steps: int, watch: SpikewatchCallback | None = None) -> None:
        super().__init__()
        self.steps, self.watch = steps, watch
        self.net = make_net()
        self.forwarded: list[int] = []
        self.ledger_forwards = 0

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y, where = batch
        position = int(where[0])
        self.forwarded.append(position)
        if self.watch is not None and self.watch.engine is not None:
            self.ledger_forwards += position in self.watch.engine.ledger
        return functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self) -> Any:
        opt, sched = make_optimizer(self.net, self.steps)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def make_trainer(callbacks: list[pl.Callback], *, max_steps: int, **extra: Any) -> pl.Trainer:
    """A quiet CPU trainer with clipping at 1.0."""
    options: dict[str, Any] = {
        "accelerator": "cpu",
        "devices": 1,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "gradient_clip_val": 1.0,
        "deterministic": True,
        **extra,
    }
    return pl.Trainer(max_steps=max_steps, callbacks=callbacks, **options)


def loader(data: TensorDataset, batch_size: int) -> DataLoader[Any]:
    """The training dataloader: batch i is data position i."""
    return DataLoader(data, batch_size=batch_size, shuffle=False)
