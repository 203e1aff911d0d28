"""What `SpikewatchCallback` checks and reads on the trainer at fit and train start."""

from __future__ import annotations

import copy
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.core.optimizer import LightningOptimizer

from spikewatch.errors import bad_value
from spikewatch_hooks.core.engine import GuardEngine


def unwrap_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """The torch optimizer inside Lightning's wrapper (the one the snapshots copy)."""
    inner: torch.optim.Optimizer = (
        optimizer.optimizer if isinstance(optimizer, LightningOptimizer) else optimizer
    )
    return inner


def check_setup(trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
    """Raise `ConfigError` naming the setting and the fix for what the callback cannot guard."""
    if not pl_module.automatic_optimization:
        raise bad_value(
            "automatic_optimization",
            False,
            "SpikewatchCallback needs automatic optimization; with manual optimization "
            "(one or several optimizers) build a spikewatch_hooks.SpikeGuard on "
            "list(self.optimizers()) in on_train_start and call guard.accept(position) "
            "and guard.step(loss, grad_norm) in training_step: see the README section "
            "'Lightning: manual optimization'",
        )
    # Lightning itself allows one optimizer only with automatic optimization.
    if len(trainer.lr_scheduler_configs) > 1:
        raise bad_value(
            "configure_optimizers",
            f"{len(trainer.lr_scheduler_configs)} lr schedulers",
            "return at most one lr scheduler (chain them with torch SequentialLR)",
        )


def run_length(trainer: pl.Trainer) -> float | None:
    """The run's optimizer steps, when Lightning knows them (else None): the smaller of
    ``max_steps`` and the epochs' batches over ``accumulate_grad_batches``."""
    try:
        return float(trainer.estimated_stepping_batches)
    except Exception:  # an estimate only: a length Lightning cannot tell is unknown
        return float(trainer.max_steps) if trainer.max_steps >= 0 else None


class HeldSchedule:
    """A step-interval scheduler's state, kept across an update that must not count.

    Only when the dataloader could not be wrapped does a ledger batch reach Lightning's
    optimizer step (its grads dropped); Lightning still steps the scheduler, which
    `release` undoes.
    """

    def __init__(self) -> None:
        self._held: tuple[dict[str, Any], list[Any]] | None = None

    def hold(self, trainer: pl.Trainer, optimizer: torch.optim.Optimizer) -> None:
        """Before Lightning's optimizer and scheduler step: keep the schedule."""
        configs = trainer.lr_scheduler_configs
        if configs and configs[0].interval == "step":
            lrs = [group["lr"] for group in optimizer.param_groups]
            self._held = (copy.deepcopy(configs[0].scheduler.state_dict()), lrs)

    def release(self, engine: GuardEngine) -> None:
        """After them: put the kept schedule and learning rates back."""
        if self._held is None or engine.scheduler is None:
            return
        state, lrs = self._held
        self._held = None
        engine.scheduler.load_state_dict(state)
        for group, lr in zip(engine.optimizer.param_groups, lrs, strict=True):
            group["lr"] = lr
