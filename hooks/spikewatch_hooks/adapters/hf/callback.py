"""`SpikewatchCallback`: the watchdog inside a Hugging Face ``transformers.Trainer``.

The callback translates ``Trainer`` events into calls on a `GuardEngine` (the same
engine, config and policy as `SpikeGuard`), fed by `TrainerTaps` on the live Trainer.
Units, as in `SpikeGuard`: a *step* is one optimizer step (``gradient_accumulation_steps``
micro-batches); a data *position* is one batch yielded by the train dataloader, counted
from the start of the run (across ``resume_from_checkpoint``). ``margin`` and
``snapshot_every`` count steps; ``skip_ahead`` counts steps' worth of batches
(``skip_ahead * gradient_accumulation_steps`` positions). Event timeline of one step in
transformers 5.x, and what the callback does at each event::

    on_train_begin          build the engine from the live model, optimizer, lr_scheduler
                            (unwrapped from accelerate); tap the Trainer; on a resume, load
                            the guard's state from the checkpoint's trainer_state.json
    for each optimizer step:
        get_batch_samples   (tapped) the step's batches, numbered; ledger positions are
                            dropped here: no forward, no backward, no step for them;
                            the others kept for the forensics probe (`hf.forensics`)
        training_step x GA  (tapped) the micro-batch losses are summed on the device
        clip_grad_norm_     (tapped) the pre-clip norm, on the device
        on_pre_optimizer_step   loss and grad norm go to the engine (no host read): skip
                            -> every ``.grad = None`` (the optimizer leaves those params
                            and their state alone); rollback -> restore the snapshot now,
                            probe the suspect batches from it: data or state?
        optimizer.step(); lr_scheduler.step(); zero_grad(); global_step += 1
        on_step_end         a rolled-back step: undo that scheduler step; otherwise count
                            the step (snapshot when due); a checkpoint is due -> the
                            guard's state goes into trainer_state.json with it
        log / evaluate / save (if due: any logging_steps)

A rollback restores the model, optimizer, scheduler and RNGs in place from the engine's
snapshot ring. ``state.global_step`` is *not* set back: the Trainer logs only while
``global_step`` exceeds the last logged step, so a smaller step would silence its logs
until the old step came round again. Instead ``state.max_steps`` grows by the abandoned
steps, so the surviving branch still takes the full ``max_steps`` updates on the
restored schedule. The data keeps going forward: the batches since the snapshot and
``skip_ahead`` steps' worth more are in the ledger and those still ahead are dropped
unseen. The dataset needs room for them: a run whose data ends at ``max_steps`` ends
that much short (a warning says so).
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch
from transformers import (
    Trainer,
    TrainerCallback,
    TrainerControl,
    TrainerState,
    TrainingArguments,
)

from spikewatch.errors import SpikewatchError
from spikewatch.settings import MonitorConfig
from spikewatch.transport import Transport
from spikewatch_hooks.adapters.hf.forensics import TrainerForensics
from spikewatch_hooks.adapters.hf.live import calling_trainer, live_objects
from spikewatch_hooks.adapters.hf.resume import resume_guard, store_state
from spikewatch_hooks.adapters.hf.taps import TrainerTaps
from spikewatch_hooks.core.engine import GuardEngine
from spikewatch_hooks.core.options import GuardOptions
from spikewatch_hooks.core.run_length import fit_to_run_length
from spikewatch_hooks.distributed.lockstep import Lockstep
from spikewatch_hooks.forensics.evaluate import ProbeLoss
from spikewatch_hooks.forensics.options import ForensicsOptions

log = logging.getLogger(__name__)


class SpikewatchCallback(TrainerCallback):
    """Watches every step of a ``Trainer``: skips bad updates, rolls back, skips bad data.

    Usage: ``Trainer(model, args, train_dataset=ds, callbacks=[SpikewatchCallback()])``,
    at any ``logging_steps`` and ``gradient_accumulation_steps``. The guard's state is
    saved with every HF checkpoint and restored by ``resume_from_checkpoint``.

    Args:
        run_id: the run's name in incidents and metrics.
        config: detection and policy settings (`MonitorConfig`).
        snapshot_every: take an in-memory snapshot every this many optimizer steps
            (default 100; with ``margin`` and ``skip_ahead`` left at their defaults it is
            fitted to ``max_steps`` at train start, see `run_length.fit_to_run_length`).
        keep_snapshots: how many snapshots the ring holds (one CPU copy of model and
            optimizer state each).
        margin: shortcut for ``config.policy.margin`` (roll back at least this many
            optimizer steps before the onset).
        transport: where records go; default: an embedded monitor (no server).
        monitor_url: send records to a `spikewatch serve` at this URL instead (its
            decisions come back as commands, applied at the next step boundary).
        token: the service's bearer token (default: ``$SPIKEWATCH_TOKEN``).
        probe_loss, quarantine_file, forensics, probe_cache_batches, probe_cache_bytes:
            the forensics probe after a rollback (`ForensicsOptions`, `hf.forensics`);
            ``probe_loss`` defaults to one derived from the model's head (causal LM,
            sequence classification: `hf.probe_loss`).

    Example:
        >>> SpikewatchCallback(run_id="gpt", margin=20).options.config.policy.margin
        20
    """

    def __init__(
        self,
        *,
        run_id: str = "run",
        config: MonitorConfig | None = None,
        snapshot_every: int | None = None,
        keep_snapshots: int = 4,
        margin: int | None = None,
        transport: Transport | None = None,
        monitor_url: str | None = None,
        token: str | None = None,
        probe_loss: ProbeLoss | None = None,
        quarantine_file: str | os.PathLike[str] | None = None,
        forensics: bool = True,
        probe_cache_batches: int = 64,
        probe_cache_bytes: int = 512 * 2**20,
    ) -> None:
        self.forensics_options = ForensicsOptions(
            probe_loss=probe_loss, quarantine_file=quarantine_file, forensics=forensics,
            probe_cache_batches=probe_cache_batches, probe_cache_bytes=probe_cache_bytes,
        )  # fmt: skip
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
        self._taps: TrainerTaps | None = None
        self._forensics: TrainerForensics | None = None
        self._trainer: Trainer | None = None
        self._params: list[torch.Tensor] = []
        self._accumulation = 1
        self._target = 0  # optimizer steps owed on the surviving branch (whole run)
        self._outcome = "none"  # the engine's verdict on the current step
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

    def attach(self, trainer: Trainer) -> None:
        """Name the Trainer explicitly (only needed when ``trainer.train()`` is driven
        from code the callback cannot see on the call stack, e.g. a custom loop)."""
        self._trainer = trainer

    # -- events -----------------------------------------------------------------------
    def on_train_begin(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        **kwargs: Any,
    ) -> None:
        """Build the engine on the live objects, tap the Trainer, load a resumed state."""
        model, optimizer, scheduler = live_objects(kwargs)
        # Every rank's loss is its own now (no longer the logged all-rank mean): the
        # ranks gather every few steps and decide alike on the mean.
        lockstep = Lockstep() if Lockstep.active() else None
        # The Trainer knows the run length: defaults that would undo a large share of a
        # short run adapt to it, explicit ones out of proportion warn (core/run_length).
        length = state.max_steps if state.max_steps > 0 else None  # 0: not known yet
        self.options = fit_to_run_length(self.options, length)
        self.config = self.options.config
        self._engine = self.options.engine(model, optimizer, scheduler, lockstep=lockstep)
        self._engine.reporting = state.is_world_process_zero
        self._params = [p for g in optimizer.param_groups for p in g["params"]]
        self._accumulation = max(int(args.gradient_accumulation_steps), 1)
        # skip_ahead counts optimizer steps; the ledger counts loader batches.
        self._engine.batches_per_step = self._accumulation
        if self._taps is not None:
            self._taps.detach()
        self._taps = TrainerTaps(self._engine.ledger)
        trainer = self._trainer or calling_trainer()
        self._taps.attach(trainer)
        self._forensics = TrainerForensics.start(
            self._engine, self.forensics_options, trainer=trainer, taps=self._taps,
            train_dataloader=kwargs.get("train_dataloader"), resumed=state.global_step > 0,
        )  # fmt: skip
        self._target = state.max_steps - state.global_step
        if state.global_step > 0:
            target = resume_guard(
                self._engine, self._taps, args=args, state=state,
                loader=kwargs.get("train_dataloader"), accumulation=self._accumulation,
            )  # fmt: skip
            self._target = self._target if target is None else target

    def on_pre_optimizer_step(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        """The step's values go to the engine; its verdict is applied before the update."""
        engine, taps = self.engine, self._tapped()
        engine.count("skipped_batches", taps.passed_over)
        taps.passed_over, taps.unstepped = 0, False
        self._outcome = "none"
        if engine.halted:
            return
        if not taps.positions or taps.loss is None:
            engine.count("unobserved_steps")  # a Trainer subclass bypassed the taps
            return
        decision = engine.observe(taps.loss, taps.grad_norm, data_position=taps.positions[-1])
        self._outcome = engine.apply(decision)
        if self._outcome == "none":
            return
        for p in self._params:
            p.grad = None  # torch optimizers skip params without a grad: no state change
        if self._outcome == "skip":
            engine.count("skipped_steps")
        elif self._outcome == "rollback":
            self._after_rollback(state)
        else:  # halt
            control.should_training_stop = True

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        """Count the step (or undo a rolled-back step's schedule); save state with a checkpoint."""
        engine = self.engine
        engine.clear_found_inf()
        if self._saved_lr is not None:
            scheduler_state, lrs = self._saved_lr
            engine.scheduler.load_state_dict(scheduler_state)
            for group, lr in zip(engine.optimizer.param_groups, lrs, strict=True):
                group["lr"] = lr
            self._saved_lr = None
        elif self._outcome in ("none", "skip") and not engine.halted:
            engine.finish_step()
        self._outcome = "none"
        if control.should_save:
            store_state(state, self.engine, target=self._target, taps=self._tapped())

    def on_epoch_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        """Drop the gradients of an epoch's last, unfinished accumulation group: with
        ledger batches dropped the epoch can end mid-group, and the Trainer would add
        them to the next epoch's first step."""
        taps = self._tapped()
        if taps.unstepped:
            for p in self._params:
                p.grad = None
            taps.start_step()
            taps.unstepped = False
        if control.should_save:
            store_state(state, self.engine, target=self._target, taps=self._tapped())

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        """Untap the Trainer; say so when the data ran out before the branch was complete."""
        engine = self.engine
        engine.finish()
        if self._taps is not None:
            self._taps.detach()
        if self._forensics is not None:
            self._forensics.stop()
        short = self._target - engine.step_count
        if short > 0 and not engine.halted:
            log.warning(
                "spikewatch: training ended %d steps short of max_steps after skipping %d "
                "batches: give the Trainer data beyond max_steps for the skipped batches",
                short,
                engine.stats["skipped_batches"],
            )

    # -- helpers ----------------------------------------------------------------------
    def _tapped(self) -> TrainerTaps:
        if self._taps is None:
            raise SpikewatchError("SpikewatchCallback has not started: call trainer.train()")
        return self._taps

    def _after_rollback(self, state: TrainerState) -> None:
        """Finish a rollback decided before this step's update (which will not happen)."""
        engine = self.engine
        scheduler = engine.scheduler
        if scheduler is not None:  # the Trainer will step it once more: undo that
            lrs = [float(g["lr"]) for g in engine.optimizer.param_groups]
            self._saved_lr = (scheduler.state_dict(), lrs)
        # global_step will count this step too; the surviving branch owes the rest.
        state.max_steps = state.global_step + 1 + self._target - engine.step_count
