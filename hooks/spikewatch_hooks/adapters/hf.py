"""`SpikewatchCallback`: the watchdog inside a Hugging Face ``transformers.Trainer``.

The callback only translates ``Trainer`` events into calls on a `GuardEngine` (the same
engine, config and policy as `SpikeGuard`). Event timeline of one optimizer step in
transformers 5.x, and what the callback does at each event::

    on_train_begin          build the engine from the live model, optimizer, lr_scheduler
                            (unwrapped from accelerate); require logging_steps=1
    for each optimizer step:    # data position p: 0, 1, ... from this train() call on,
                                # one per optimizer step (gradient_accumulation_steps batches)
        on_step_begin       p += 1; p in the skip ledger -> this step is passed over
        forward, backward, clip_grad_norm_      # the Trainer keeps the pre-clip norm
        on_pre_optimizer_step   read the (clipped) grads: NaN/Inf -> skip; passed over or
                            skip -> every ``.grad = None``: the optimizer leaves those
                            params and their state alone
        optimizer.step(); on_optimizer_step; lr_scheduler.step(); zero_grad()
        global_step += 1
        on_step_end         passed over -> undo that scheduler step
        on_log(loss, grad_norm)     the step's values reach the monitor; its decision
                            is applied here, at the step boundary: rollback or halt
        evaluate / save (if due)

Where HF forces a lag: the step's loss and pre-clip grad norm reach a callback only in
``on_log``, after ``optimizer.step()``. Non-finite values are still caught in time,
from the gradients themselves (a NaN/Inf loss gives NaN gradients and clipping keeps
them non-finite). A finite but extreme grad norm is known one step late: its clipped
update has already been applied, so the step is counted in ``stats["late_skips"]`` and
left; if the loss then jumps, the monitor's rollback undoes it. The Trainer logs a NaN
loss as a running mean (``logging_nan_inf_filter``), so a step whose gradients were
non-finite is reported to the monitor with a NaN loss. The gradient check reads one
value on the host per step (on a GPU, a sync; ``logging_steps=1`` already makes the
Trainer sync once per step to log the loss).

A rollback restores the model, optimizer, scheduler and RNGs in place from the engine's
snapshot ring. ``state.global_step`` is *not* set back: the Trainer logs only while
``global_step`` exceeds the last logged step, so a smaller step would silence ``on_log``
(and every value with it) until the old step came round again. Instead
``state.max_steps`` grows by the abandoned and passed-over steps, so the surviving
branch still takes the full ``max_steps`` updates on the restored schedule, and
``global_step`` keeps counting batches read (monotonic, as loggers expect). The data
keeps going forward: the batches since the snapshot and ``skip_ahead`` more are in the
ledger, and those still ahead are passed over (their forward and backward run, the
Trainer has no hook to drop a batch, but their update and scheduler step do not). The
dataset needs room for them: a run whose data ends at ``max_steps`` ends that much short.
"""

from __future__ import annotations

import logging
import math
from typing import Any, cast

import torch
from torch import nn
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from spikewatch.errors import SpikewatchError, bad_value
from spikewatch.settings import MonitorConfig
from spikewatch.transport import Transport
from spikewatch_hooks.core.engine import GuardEngine
from spikewatch_hooks.core.options import GuardOptions
from spikewatch_hooks.distributed.lockstep import Lockstep

log = logging.getLogger(__name__)


class SpikewatchCallback(TrainerCallback):
    """Watches every step of a ``Trainer``: skips bad updates, rolls back, skips bad data.

    Usage: ``Trainer(model, args, train_dataset=ds, callbacks=[SpikewatchCallback()])``
    with ``TrainingArguments(logging_steps=1, ...)``.

    Args:
        run_id: the run's name in incidents and metrics.
        config: detection and policy settings (`MonitorConfig`).
        snapshot_every: take an in-memory snapshot every this many optimizer steps.
        keep_snapshots: how many snapshots the ring holds (one CPU copy of model and
            optimizer state each).
        margin: shortcut for ``config.policy.margin`` (roll back at least this many steps
            before the onset).
        transport: where records go; default: an embedded monitor (no server).
        monitor_url: send records to a `spikewatch serve` at this URL instead (its
            decisions come back as commands, applied at the next step boundary).
        token: the service's bearer token (default: ``$SPIKEWATCH_TOKEN``).
    """

    def __init__(
        self,
        *,
        run_id: str = "run",
        config: MonitorConfig | None = None,
        snapshot_every: int = 100,
        keep_snapshots: int = 4,
        margin: int | None = None,
        transport: Transport | None = None,
        monitor_url: str | None = None,
        token: str | None = None,
    ) -> None:
        self.options = GuardOptions.build(
            run_id=run_id,
            config=config,
            snapshot_every=snapshot_every,
            keep_snapshots=keep_snapshots,
            margin=margin,
            transport=transport,
            monitor_url=monitor_url,
            token=token,
        )
        self.run_id, self.config = run_id, self.options.config
        self._engine: GuardEngine | None = None
        self._params: list[torch.Tensor] = []
        self._target = 0  # optimizer steps this train() call owes on the surviving branch
        self._position = -1  # data position of the current step
        self._observed = -1  # data position last seen in on_log
        self._pass_over = False  # the current step's data is in the skip ledger
        self._nonfinite = False  # the current step's gradients are NaN/Inf
        self._saved_lr: tuple[dict[str, Any], list[float]] | None = None

    # -- read-only views --------------------------------------------------------------
    @property
    def transport(self) -> Transport | None:
        """Where records go: built with the engine at train start (None before)."""
        return None if self._engine is None else self._engine.transport

    @property
    def engine(self) -> GuardEngine:
        """The `GuardEngine` built at ``on_train_begin``."""
        if self._engine is None:
            raise SpikewatchError(
                "SpikewatchCallback has not started: pass it in Trainer(callbacks=[...]) "
                "and call trainer.train()"
            )
        return self._engine

    @property
    def stats(self) -> dict[str, Any]:
        """Counters: rollbacks, skipped_steps, skipped_batches, incidents, halted, ..."""
        return self.engine.summary()

    # -- events -----------------------------------------------------------------------
    def on_train_begin(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        **kwargs: Any,
    ) -> None:
        """Build the engine from the live training objects; fail fast on wrong settings."""
        model, optimizer, scheduler = _live_objects(args, state, kwargs)
        # Embedded, every rank decides alike on the Trainer's averaged loss with no
        # collective; with a service only rank 0 talks to it, so the ranks gather (every
        # 8 steps) to learn together of an operator's command.
        lockstep = Lockstep() if Lockstep.active() and self.options.monitor_url else None
        self._engine = self.options.engine(model, optimizer, scheduler, lockstep=lockstep)
        # Under DDP the Trainer logs the loss already averaged over ranks and the grads are
        # averaged, so every rank's engine decides alike with no extra collective; only
        # the main process speaks.
        self._engine.reporting = state.is_world_process_zero
        self._params = [p for g in optimizer.param_groups for p in g["params"]]
        self._target = state.max_steps - state.global_step
        self._position = self._observed = -1

    def on_step_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        """Count the step's data position; pass over data in the skip ledger."""
        self._position += 1
        self._pass_over = self._position in self.engine.ledger
        self._nonfinite = False

    def on_pre_optimizer_step(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        """Skip the coming update for passed-over data or non-finite gradients."""
        if not self._pass_over:
            self._nonfinite = not _grads_finite(self._params)
        if not (self._pass_over or self._nonfinite):
            return
        for p in self._params:
            p.grad = None  # torch optimizers skip params without a grad: no state change
        scheduler = self.engine.scheduler
        if self._pass_over and scheduler is not None:
            lrs = [float(g["lr"]) for g in self.engine.optimizer.param_groups]
            self._saved_lr = (scheduler.state_dict(), lrs)

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        """A passed-over step does not count: undo its scheduler step."""
        if not self._pass_over:
            return
        self.engine.count("skipped_batches")
        if self._saved_lr is not None:
            scheduler_state, lrs = self._saved_lr
            self.engine.scheduler.load_state_dict(scheduler_state)
            for group, lr in zip(self.engine.optimizer.param_groups, lrs, strict=True):
                group["lr"] = lr
            self._saved_lr = None

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, float] | None = None,
        **kwargs: Any,
    ) -> TrainerControl:
        """Feed the step's loss and grad norm to the engine; apply its decision here."""
        if self._engine is None or not logs or "loss" not in logs:
            return control  # evaluation or end-of-training logs
        if self._observed == self._position:
            return control  # one observation per step
        self._observed = self._position
        if not self._pass_over and self._observe(logs) == "halt":
            control.should_training_stop = True
            return control
        self._owe_steps(state, control)
        return control

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        """Say so when the data ran out before the surviving branch was complete."""
        engine = self.engine
        engine.finish()
        short = self._target - engine.step_count
        if short > 0 and not engine.halted:
            log.warning(
                "spikewatch: training ended %d steps short of max_steps after skipping %d "
                "batches: give the Trainer data beyond max_steps for the skipped batches",
                short,
                engine.stats["skipped_batches"],
            )

    # -- helpers ----------------------------------------------------------------------
    def _observe(self, logs: dict[str, float]) -> str:
        """Run the step's values through the engine and apply its decision."""
        engine = self.engine
        loss = math.nan if self._nonfinite else float(logs["loss"])
        decision = engine.observe(loss, logs.get("grad_norm"), data_position=self._position)
        outcome = engine.apply(decision)
        if outcome in ("rollback", "halt"):
            return outcome
        if self._nonfinite:
            engine.count("skipped_steps")
        elif outcome == "skip":
            engine.count("late_skips")
            log.warning(
                "spikewatch: step %d should have been skipped, but the Trainer reports its "
                "grad norm only after optimizer.step(); its clipped update stays",
                engine.step_count,
            )
        engine.finish_step()
        return outcome

    def _owe_steps(self, state: TrainerState, control: TrainerControl) -> None:
        """Make ``max_steps`` cover the steps still owed on the surviving branch."""
        max_steps = state.global_step + self._target - self.engine.step_count
        if state.max_steps <= state.global_step < max_steps:
            # The Trainer's own budget said stop at this step; the branch is not done.
            control.should_training_stop = False
        state.max_steps = max_steps


def _live_objects(
    args: TrainingArguments, state: TrainerState, kwargs: dict[str, Any]
) -> tuple[nn.Module, torch.optim.Optimizer, Any]:
    """The model, optimizer and scheduler a callback event carries, unwrapped from accelerate."""
    if args.logging_strategy != "steps" or state.logging_steps != 1:
        raise bad_value(
            "logging_steps",
            args.logging_steps,
            "set logging_steps=1 (and logging_strategy='steps') in TrainingArguments: "
            "SpikewatchCallback reads every step's loss and grad norm from on_log",
        )
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


def _grads_finite(params: list[torch.Tensor]) -> bool:
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return True
    return bool(torch.isfinite(torch.nn.utils.get_total_norm(grads)))
