"""`SpikewatchCallback`: the watchdog inside a Lightning ``Trainer``.

    import lightning as L
    trainer = L.Trainer(max_steps=10_000, callbacks=[SpikewatchCallback(run_id="gpt")])

Event timeline (automatic optimization, one optimizer), as a pseudocode training loop::

    on_fit_start          ConfigError, with the fix, on manual optimization or several
                          lr schedulers
    on_train_start        (a checkpoint is restored by now) fit default settings to the
                          run length (`run_length`); build the GuardEngine on pl_module
                          and the trainer's optimizer and scheduler; snapshot step 0; wrap
                          the dataloader (`lightning_data`): ledger batches are left out
    for batch in train_dataloader:             # read forward only, never rewound
        on_train_batch_start      position = the batch's position since the run began;
                                  the batch kept for the forensics probe
        loss = training_step(batch)            # / accumulate_grad_batches (Lightning)
        on_before_backward        add the loss tensor to this step's (no host-device sync)
        loss.backward()
        (accumulate_grad_batches > 1: the next micro-batch, until the optimizer step)
        on_before_optimizer_step  grads are still pre-clip:
            position in the skip ledger -> every param.grad = None (batch passed over)
            else grad_norm = get_total_norm(grads); decision = engine.observe(loss, ...)
                skip_step        -> every param.grad = None, counted in skipped_steps
                rollback or halt -> every param.grad = None, acted on at the batch end
        clip gradients, optimizer.step(), lr_scheduler.step()        # Lightning
        on_train_batch_end
            rollback -> model, optimizer, scheduler, RNG restored from the snapshot ring
                        (the suspect batches probed from it: data or state?);
                        the batches consumed since, and ``skip_ahead`` more, go to the ledger
            halt     -> trainer.should_stop = True (the reason is logged)
            ledger   -> (dataloader not wrapped) the scheduler step is undone
            else     -> engine.finish_step() (a snapshot every ``snapshot_every`` steps)
            trainer.fit_loop.epoch_loop.max_steps = max_steps + (global_step - step_count)

Torch optimizers leave a parameter whose ``.grad`` is None untouched (no update, no weight
decay): that is how a step is skipped; a skipped update still advances the schedule, as
in `SpikeGuard`. Lightning's ``global_step`` counts every ``optimizer.step()`` call and
never goes back; `step_count` counts useful steps and rewinds with a rollback. With
``max_steps`` set, the callback raises the trainer's limit by the steps that did not
count, so the run ends after ``max_steps`` useful steps; with ``max_steps=-1`` epochs
bound the run: give them headroom.

Units: steps (``step_count``, ``margin``, ``snapshot_every``, ``skip_ahead``) count
optimizer steps; data positions and ``skipped_batches`` count dataloader batches (with
``accumulate_grad_batches=4`` a ``skip_ahead`` of 100 steps passes over 400 batches).
Settings it needs: a deterministic data order (no shuffling, or a seeded sampler);
``snapshot_every`` well below ``margin``. A mid-epoch resume (``ckpt_path=``) works with
a plain dataloader: Lightning restarts the epoch, the callback passes over the batches
trained before the checkpoint.
"""

from __future__ import annotations

import copy
import logging
import os
from typing import Any

import lightning.pytorch as pl
import torch

from spikewatch.records import Decision
from spikewatch.settings import MonitorConfig
from spikewatch.transport import Transport
from spikewatch_hooks.adapters import lightning_data
from spikewatch_hooks.adapters.lightning_data import DataPositions
from spikewatch_hooks.adapters.lightning_forensics import LightningForensics
from spikewatch_hooks.adapters.lightning_setup import (
    HeldSchedule,
    StepLimit,
    check_setup,
    run_length,
    unwrap_optimizer,
)
from spikewatch_hooks.core.engine import GuardEngine
from spikewatch_hooks.core.options import GuardOptions
from spikewatch_hooks.core.run_length import fit_to_run_length
from spikewatch_hooks.distributed.lockstep import Lockstep
from spikewatch_hooks.forensics.evaluate import ProbeLoss
from spikewatch_hooks.forensics.options import ForensicsOptions

log = logging.getLogger(__name__)


class SpikewatchCallback(pl.Callback):
    """Watches every step, skips bad updates, rolls back and skips bad batches.

    Usage: ``L.Trainer(max_steps=..., callbacks=[SpikewatchCallback()])``.

    Args:
        run_id: the run's name in incidents and metrics.
        config: detection and policy settings (`MonitorConfig`).
        snapshot_every: take an in-memory snapshot every this many useful steps
            (default 100; fitted to a short run, see `run_length`).
        keep_snapshots: how many snapshots the ring holds (one CPU copy of model and
            optimizer state each).
        transport: where records go; default: an embedded monitor (no server).
        monitor_url: send records to a `spikewatch serve` at this URL instead (its
            decisions come back as commands, applied at the next step boundary).
        token: the service's bearer token (default: ``$SPIKEWATCH_TOKEN``).
        margin: shortcut for ``config.policy.margin`` (roll back at least this many steps
            before the onset).
        probe_loss, quarantine_file, forensics, probe_cache_batches, probe_cache_bytes:
            the forensics probe after a rollback (`ForensicsOptions`); ``probe_loss``
            defaults to the LightningModule's own ``probe_loss(batch)`` method, if it
            has one, else forensics is off (`lightning_forensics`).

    Example:
        >>> callback = SpikewatchCallback(run_id="gpt", snapshot_every=50, margin=100)
        >>> callback.config.policy.margin, callback.stats["rollbacks"]
        (100, 0)
        >>> SpikewatchCallback(keep_snapshots=0)
        Traceback (most recent call last):
        ...
        spikewatch.errors.ConfigError: keep_snapshots=0 is invalid: use an integer >= 1
    """

    def __init__(
        self,
        *,
        run_id: str = "run",
        config: MonitorConfig | None = None,
        snapshot_every: int | None = None,
        keep_snapshots: int = 4,
        transport: Transport | None = None,
        monitor_url: str | None = None,
        token: str | None = None,
        margin: int | None = None,
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
            run_id=run_id, config=config, snapshot_every=snapshot_every,
            keep_snapshots=keep_snapshots, margin=margin, transport=transport,
            monitor_url=monitor_url, token=token,
        )  # fmt: skip
        self.run_id, self.config = run_id, self.options.config
        self.engine: GuardEngine | None = None
        self.positions = DataPositions()
        self._wrapped = False  # the training dataloader leaves ledger batches out
        self._position = 0
        self._loss: torch.Tensor | None = None
        self._mode = "none"  # what on_before_optimizer_step decided for this batch
        self._pending: Decision | None = None
        self._held_schedule = HeldSchedule()
        self._limit = StepLimit()
        self._forensics: LightningForensics | None = None
        self._restored: dict[str, Any] | None = None

    # -- read-only views --------------------------------------------------------------
    @property
    def transport(self) -> Transport | None:
        """Where records go: built with the engine at train start (None before)."""
        return None if self.engine is None else self.engine.transport

    @property
    def step_count(self) -> int:
        """Useful optimizer steps on the current branch (rewinds with a rollback)."""
        return 0 if self.engine is None else self.engine.step_count

    @property
    def stats(self) -> dict[str, Any]:
        """Counters: rollbacks, skipped_steps, skipped_batches, incidents, halted, ..."""
        if self.engine is None:
            return {"rollbacks": 0, "skipped_steps": 0, "skipped_batches": 0, "halted": False,
                    "last_verdict": None}  # fmt: skip
        return self.engine.summary()

    # -- set-up -----------------------------------------------------------------------
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Fail fast on a setup the callback cannot guard; extend a resumed run's limit."""
        check_setup(trainer, pl_module)
        # Before Lightning restores global_step and checks max_steps (a resumed run that
        # had undone steps would otherwise stop before on_train_start).
        self._limit.begin(trainer, int(self._restored["uncounted"]) if self._restored else 0)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Build the engine on the live objects (a checkpoint is restored by now)."""
        optimizer = unwrap_optimizer(trainer.optimizers[0])
        configs = trainer.lr_scheduler_configs
        scheduler = configs[0].scheduler if configs else None
        self.options = fit_to_run_length(self.options, run_length(trainer))
        self.config = self.options.config
        # Under DDP each rank sees its own loss: decide on the all-gathered values.
        lockstep = Lockstep() if Lockstep.active() else None
        self.engine = self.options.engine(pl_module, optimizer, scheduler, lockstep=lockstep)
        self.engine.batches_per_step = trainer.accumulate_grad_batches
        if self._restored is not None:  # Lightning restored the live objects
            self.engine.load_guard_state(self._restored["guard"])
            self.positions.resume(self._restored)
        self._restored = None
        self._forensics = LightningForensics.start(self.engine, self.forensics_options, pl_module)
        self._wrapped = lightning_data.install(
            trainer, self.engine, self.positions, self._forensics
        )
        self._limit.mark(trainer, self.engine.step_count)

    # -- per batch --------------------------------------------------------------------
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        """Number the batch in the data order; keep it for the forensics probe."""
        self._position = self.positions.start_batch(wrapped=self._wrapped)
        if self._forensics is not None and self._position not in self._engine().ledger:
            self._forensics.remember(self._position, batch)

    def on_before_backward(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor
    ) -> None:
        """Add the training_step's loss (already divided by accumulate_grad_batches) to
        this optimizer step's: the mean over its micro-batches."""
        self._loss = loss.detach() if self._loss is None else self._loss + loss.detach()

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any
    ) -> None:
        """Decide on the pre-clip values; drop the grads of an update that must not happen."""
        engine = self._engine()
        params = [p for group in engine.optimizer.param_groups for p in group["params"]]
        self._mode = self._decide(engine, params)
        self._loss = None  # the next optimizer step's micro-batches start afresh
        if self._mode in ("halted", "ledger", "skip", "act"):
            for p in params:
                p.grad = None
        if self._mode == "ledger":
            self._held_schedule.hold(trainer, engine.optimizer)

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        """Apply a rollback or halt at the step boundary; count the step."""
        engine = self._engine()
        mode, self._mode = self._mode, "none"
        if mode == "act" and self._pending is not None:
            decision, self._pending = self._pending, None
            if engine.apply(decision) == "halt":
                self._stop(trainer, engine)
        elif mode == "halted":
            self._stop(trainer, engine)
        elif mode == "ledger":
            self._held_schedule.release(engine)
            engine.count("skipped_batches")
        elif mode in ("step", "skip", "idle"):
            engine.position = self._position
            engine.finish_step()
        engine.clear_found_inf()
        self._limit.count(trainer, engine.step_count)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Give the trainer its own ``max_steps`` back (a later ``fit`` starts from it)."""
        if self.engine is not None:
            self.engine.finish()
        if self._forensics is not None:
            self._forensics.stop()
        self._limit.give_back(trainer)

    # -- checkpoints ------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Guard state (ledger, detectors, counters) in plain JSON types."""
        if self.engine is None:
            return {}
        guard = self.engine.guard_state()
        seen = self.positions.started
        positions = self.positions.state_dict(seen)
        return {"batches_seen": seen, "uncounted": self._limit.uncounted,
                "positions": positions, "guard": guard}  # fmt: skip

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Keep the saved state; it is applied when training starts."""
        self._restored = copy.deepcopy(state_dict) if state_dict else None

    # -- helpers ----------------------------------------------------------------------
    def _decide(self, engine: GuardEngine, params: list[torch.Tensor]) -> str:
        if engine.halted:
            return "halted"
        if self._position in engine.ledger:
            return "ledger"
        if self._loss is None:
            return "idle"  # training_step returned None: nothing to observe
        grads = [p.grad for p in params if p.grad is not None]
        grad_norm = torch.nn.utils.get_total_norm(grads) if grads else None
        decision = engine.observe(self._loss, grad_norm, self._position)
        if decision is not None and decision.action in ("rollback", "halt"):
            self._pending = decision
            return "act"
        if engine.apply(decision) == "skip":
            engine.count("skipped_steps")
            return "skip"
        return "step"

    def _stop(self, trainer: pl.Trainer, engine: GuardEngine) -> None:
        if not trainer.should_stop:  # the engine has logged the reason and what to try
            log.error("spikewatch stops the Lightning trainer: %s", engine.halt_reason)
        trainer.should_stop = True

    def _engine(self) -> GuardEngine:
        if self.engine is None:
            raise RuntimeError(
                "SpikewatchCallback has no engine: it is built in on_train_start; "
                "pass the callback to L.Trainer(callbacks=[...]) and call trainer.fit"
            )
        return self.engine
