"""Forensics runs in a real Lightning ``Trainer``: the classification task of `classify_task`.

Each sample carries its dataset index (the third tensor), which the module never trains
on, so a test can check the indices the callback recorded for every batch.

- ``data``: the labels of a contiguous range of samples, starting and ending mid-batch,
  are shifted (a corrupted shard, read in order);
- ``lr``: clean data; the learning rate jumps ``lr_jump`` x from ``lr_step`` on.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from torch.nn import functional
from torch.utils.data import DataLoader, TensorDataset

from classify_task import CLASSES, make_data, make_net
from spikewatch.policy import PolicyConfig
from spikewatch.settings import MonitorConfig
from spikewatch_hooks.adapters.lightning import SpikewatchCallback

Trouble = Literal["data", "lr", "none"]
PEAK_LR, WARMUP, LR_FLOOR = 3e-2, 20, 0.1


@dataclass(frozen=True)
class Task:
    """One run's sizes and its trouble."""

    steps: int = 300
    batch_size: int = 64
    spare_batches: int = 150  # data beyond max_steps, for the batches a rollback skips
    poison_start: int = 240  # batch position of the first shifted labels
    poison_batches: int = 30
    poison_offset: int = 10  # the range starts (and ends) this many samples into a batch
    lr_step: int = 200
    lr_jump: float = 30.0
    batches: int | None = None  # dataset length in batches (default: steps + spare)

    @property
    def poisoned(self) -> range:
        """Dataset indices of the samples with shifted labels."""
        lo = self.poison_start * self.batch_size + self.poison_offset
        return range(lo, lo + self.poison_batches * self.batch_size)

    def samples_at(self, positions: list[int]) -> set[int]:
        """Dataset indices of the batches at ``positions`` (read in order)."""
        b = self.batch_size
        return {i for p in positions for i in range(p * b, (p + 1) * b)}


def indexed_data(t: Task, trouble: Trouble) -> TensorDataset:
    """`classify_task.make_data`, its labels shifted in ``t.poisoned`` for ``data``, and
    each sample's dataset index."""
    batches = t.batches or t.steps + t.spare_batches
    x, y = make_data(batches, t.batch_size).tensors
    if trouble == "data":
        bad = slice(t.poisoned.start, t.poisoned.stop)
        y[bad] = (y[bad] + 3) % CLASSES
    return TensorDataset(x, y, torch.arange(batches * t.batch_size))


class Plain(pl.LightningModule):
    """The MLP with warm-up and cosine decay; ``lr`` trouble: x ``lr_jump`` at ``lr_step``."""

    def __init__(self, t: Task, trouble: Trouble) -> None:
        super().__init__()
        self.task, self.trouble = t, trouble
        self.net = make_net()

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y, _ = batch
        return functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self) -> Any:
        opt = torch.optim.AdamW(self.parameters(), lr=PEAK_LR, weight_decay=0.01)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, self.lr_factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def lr_factor(self, step: int) -> float:
        t = self.task
        cosine = 0.5 * (1.0 + math.cos(math.pi * min(step, t.steps) / t.steps))
        jump = t.lr_jump if self.trouble == "lr" and step >= t.lr_step else 1.0
        return min(1.0, (step + 1) / WARMUP) * (LR_FLOOR + (1.0 - LR_FLOOR) * cosine) * jump


class Probed(Plain):
    """`Plain` with the per-sample loss the callback's probe calls."""

    def probe_loss(self, batch: list[torch.Tensor]) -> torch.Tensor:
        x, y, _ = batch
        return functional.cross_entropy(self.net(x), y, reduction="none")


def guard(t: Task, **options: Any) -> SpikewatchCallback:
    """The callback sized to the run (margin and skip_ahead in optimizer steps)."""
    policy = PolicyConfig(margin=20, skip_ahead=t.poison_batches, recurrence_steps=200)
    return SpikewatchCallback(run_id="pl-forensics", config=MonitorConfig(policy=policy),
                              snapshot_every=10, keep_snapshots=8, **options)  # fmt: skip


def fit(
    t: Task,
    trouble: Trouble,
    callbacks: list[pl.Callback],
    *,
    module: type[Plain] = Probed,
    shuffle: bool = False,
    max_steps: int | None = None,
    ckpt_path: str | None = None,
) -> tuple[Plain, pl.Trainer]:
    """Train one run on CPU (``shuffle``: a seeded random sampler); the module and trainer."""
    torch.manual_seed(0)
    model = module(t, trouble)
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, max_steps=max_steps or t.steps, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        gradient_clip_val=1.0, deterministic=True, callbacks=callbacks,
    )  # fmt: skip
    generator = torch.Generator().manual_seed(5) if shuffle else None
    data = DataLoader(indexed_data(t, trouble), batch_size=t.batch_size, shuffle=shuffle,
                      generator=generator)  # fmt: skip
    trainer.fit(model, data, ckpt_path=ckpt_path)
    return model, trainer


class Rollbacks(pl.Callback):
    """After each batch: at every new rollback, the verdict and LR scale it left."""

    def __init__(self, watch: SpikewatchCallback) -> None:
        self.watch = watch
        self.seen: list[dict[str, Any]] = []

    def on_train_batch_end(
        self, trainer: pl.Trainer, module: pl.LightningModule, outputs: Any, batch: Any, i: int
    ) -> None:
        engine = self.watch.engine
        assert engine is not None
        if engine.stats["rollbacks"] > len(self.seen):
            last = None if engine.forensics is None else engine.forensics.last_verdict
            self.seen.append({"cause": None if last is None else last.cause,
                              "lr_scale": engine.lr_scale, "step": engine.step_count})  # fmt: skip
