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


class StepLimit:
    """The trainer's ``max_steps``, raised by the optimizer steps that were not useful
    steps (rolled back, or a ledger batch's dropped update): the run ends after
    ``max_steps`` useful ones. Lightning's ``global_step`` never goes back.

    Example:
        >>> from types import SimpleNamespace
        >>> loop = SimpleNamespace(max_steps=100)
        >>> trainer = SimpleNamespace(max_steps=100, global_step=0,
        ...                           fit_loop=SimpleNamespace(epoch_loop=loop))
        >>> limit = StepLimit()
        >>> limit.begin(trainer, uncounted=0); limit.mark(trainer, step_count=0)
        >>> trainer.global_step = 30; limit.count(trainer, step_count=20)  # 10 undone
        >>> loop.max_steps, limit.uncounted
        (110, 10)
    """

    def __init__(self) -> None:
        self.max_steps = -1  # the trainer's own limit (-1: epochs bound the run)
        self.uncounted = 0  # global steps that were not useful steps, over the run
        self._last = (0, 0)  # (global_step, step_count) when last counted

    def begin(self, trainer: Any, uncounted: int) -> None:
        """Fit start (before Lightning checks a resumed run's global_step against it)."""
        self.max_steps, self.uncounted = trainer.max_steps, uncounted
        self._apply(trainer)

    def mark(self, trainer: Any, step_count: int) -> None:
        """Train start: count from here."""
        self._last = (trainer.global_step, step_count)

    def count(self, trainer: Any, step_count: int) -> None:
        """A batch ended: add the global steps that were not useful steps."""
        now = (trainer.global_step, step_count)
        self.uncounted += (now[0] - self._last[0]) - (now[1] - self._last[1])
        self._last = now
        self._apply(trainer)

    def give_back(self, trainer: Any) -> None:
        """Train end: the trainer's own limit back (a later ``fit`` starts from it)."""
        if self.max_steps >= 0:
            trainer.fit_loop.epoch_loop.max_steps = self.max_steps

    def _apply(self, trainer: Any) -> None:
        if self.max_steps >= 0:
            trainer.fit_loop.epoch_loop.max_steps = self.max_steps + self.uncounted
