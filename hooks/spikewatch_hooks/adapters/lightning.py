"""`SpikewatchCallback`: the watchdog inside a Lightning ``Trainer``.

    import lightning as L
    trainer = L.Trainer(max_steps=10_000, callbacks=[SpikewatchCallback(run_id="gpt")])

Event timeline (automatic optimization, one optimizer), as a pseudocode training loop::

    on_fit_start          check the setup: ConfigError, with the fix, on manual optimization,
                          several lr schedulers, accumulate_grad_batches > 1, several devices
    on_train_start        build the GuardEngine from pl_module, trainer.optimizers[0] and
                          trainer.lr_scheduler_configs[0].scheduler, after Lightning has
                          restored any checkpoint; snapshot step 0
    for batch in train_dataloader:             # read forward only, never rewound
        on_train_batch_start      position = training batches seen since the run began
        loss = training_step(batch)
        on_before_backward        keep the loss tensor (no host-device sync)
        loss.backward()
        on_before_optimizer_step  grads are still pre-clip:
            position in the skip ledger -> every param.grad = None (batch passed over)
            else grad_norm = get_total_norm(grads); decision = engine.observe(loss, ...)
                skip_step        -> every param.grad = None, counted in skipped_steps
                rollback or halt -> every param.grad = None, acted on at the batch end
        clip gradients, optimizer.step(), lr_scheduler.step()        # Lightning
        on_train_batch_end
            rollback -> model, optimizer, scheduler, RNG restored from the snapshot ring;
                        the batches consumed since, and ``skip_ahead`` more, go to the ledger
            halt     -> trainer.should_stop = True (the reason is logged)
            ledger   -> the scheduler step Lightning just took is undone
            else     -> engine.finish_step() (a snapshot every ``snapshot_every`` steps)
            trainer.fit_loop.epoch_loop.max_steps = max_steps + (global_step - step_count)

Torch optimizers leave a parameter whose ``.grad`` is None untouched (no update, no weight
decay): that is how a step is skipped; a skipped update still advances the schedule, as
in `SpikeGuard`. Lightning's ``global_step`` counts every ``optimizer.step()`` call and
never goes back; `step_count` counts useful steps and rewinds with a rollback. With
``max_steps`` set, the callback raises the trainer's limit by the steps that did not
count, so the run ends after ``max_steps`` useful steps; with ``max_steps=-1`` epochs
bound the run: give them headroom.

Settings it needs: a deterministic data order (no shuffling, or a seeded sampler), since
positions name batches, and for a mid-epoch resume a resumable dataloader;
``snapshot_every`` well below ``margin``. Ledger batches still run forward and backward
(Lightning calls ``training_step`` before any hook can refuse the batch).
"""

from __future__ import annotations

import copy
import logging
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.core.optimizer import LightningOptimizer

from spikewatch.errors import bad_value
from spikewatch.records import Decision
from spikewatch.settings import MonitorConfig
from spikewatch.transport import Transport
from spikewatch_hooks.core.engine import GuardEngine
from spikewatch_hooks.core.options import GuardOptions
from spikewatch_hooks.distributed.lockstep import Lockstep

log = logging.getLogger(__name__)


class SpikewatchCallback(pl.Callback):
    """Watches every step, skips bad updates, rolls back and skips bad batches.

    Usage: ``L.Trainer(max_steps=..., callbacks=[SpikewatchCallback()])``.

    Args:
        run_id: the run's name in incidents and metrics.
        config: detection and policy settings (`MonitorConfig`).
        snapshot_every: take an in-memory snapshot every this many useful steps.
        keep_snapshots: how many snapshots the ring holds (one CPU copy of model and
            optimizer state each).
        transport: where records go; default: an embedded monitor (no server).
        monitor_url: send records to a `spikewatch serve` at this URL instead (its
            decisions come back as commands, applied at the next step boundary).
        token: the service's bearer token (default: ``$SPIKEWATCH_TOKEN``).
        margin: shortcut for ``config.policy.margin`` (roll back at least this many steps
            before the onset).

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
        snapshot_every: int = 100,
        keep_snapshots: int = 4,
        transport: Transport | None = None,
        monitor_url: str | None = None,
        token: str | None = None,
        margin: int | None = None,
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
        self.engine: GuardEngine | None = None
        self._batches_seen = 0
        self._position = 0
        self._loss: torch.Tensor | None = None
        self._mode = "none"  # what on_before_optimizer_step decided for this batch
        self._pending: Decision | None = None
        self._held_schedule: tuple[dict[str, Any], list[Any]] | None = None
        self._max_steps = -1
        self._uncounted = 0  # global steps that were not useful steps, over the run
        self._last = (0, 0)  # (global_step, step_count) when last counted
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
            return {"rollbacks": 0, "skipped_steps": 0, "skipped_batches": 0, "halted": False}
        return self.engine.summary()

    # -- set-up -----------------------------------------------------------------------
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Fail fast on a setup the callback cannot guard; extend a resumed run's limit."""
        _check_setup(trainer, pl_module)
        # Before Lightning restores global_step and checks max_steps (a resumed run that
        # had undone steps would otherwise stop before on_train_start).
        self._max_steps = trainer.max_steps
        self._uncounted = int(self._restored["uncounted"]) if self._restored else 0
        if self._max_steps >= 0:
            trainer.fit_loop.epoch_loop.max_steps = self._max_steps + self._uncounted

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Build the engine on the live objects (a checkpoint is restored by now)."""
        optimizer = _unwrap(trainer.optimizers[0])
        configs = trainer.lr_scheduler_configs
        scheduler = configs[0].scheduler if configs else None
        # Under DDP each rank sees its own loss: decide on the all-gathered values.
        lockstep = Lockstep() if Lockstep.active() else None
        self.engine = self.options.engine(pl_module, optimizer, scheduler, lockstep=lockstep)
        if self._restored is not None:
            self._resume(self._restored)
        self._restored = None
        self._last = (trainer.global_step, self.engine.step_count)

    # -- per batch --------------------------------------------------------------------
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        """Number the batch in the data order."""
        self._position = self._batches_seen
        self._batches_seen += 1
        self._loss = None

    def on_before_backward(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor
    ) -> None:
        """Keep the training_step's loss for the decision before the optimizer step."""
        self._loss = loss.detach()

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any
    ) -> None:
        """Decide on the pre-clip values; drop the grads of an update that must not happen."""
        engine = self._engine()
        params = [p for group in engine.optimizer.param_groups for p in group["params"]]
        self._mode = self._decide(engine, params)
        if self._mode in ("halted", "ledger", "skip", "act"):
            for p in params:
                p.grad = None
        configs = trainer.lr_scheduler_configs
        if self._mode == "ledger" and configs and configs[0].interval == "step":
            lrs = [group["lr"] for group in engine.optimizer.param_groups]
            self._held_schedule = (copy.deepcopy(configs[0].scheduler.state_dict()), lrs)

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
            self._release_schedule(engine)
            engine.count("skipped_batches")
        elif mode in ("step", "skip", "idle"):
            engine.position = self._position
            engine.finish_step()
        engine.clear_found_inf()
        self._count_uncounted(trainer, engine)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Give the trainer its own ``max_steps`` back (a later ``fit`` starts from it)."""
        if self.engine is not None:
            self.engine.finish()
        if self._max_steps >= 0:
            trainer.fit_loop.epoch_loop.max_steps = self._max_steps

    # -- checkpoints ------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Guard state (ledger, detectors, counters) in plain JSON types."""
        if self.engine is None:
            return {}
        guard = self.engine.guard_state()
        return {"batches_seen": self._batches_seen, "uncounted": self._uncounted, "guard": guard}

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

    def _count_uncounted(self, trainer: pl.Trainer, engine: GuardEngine) -> None:
        """Make up for the steps that did not count: max_steps useful ones in the end."""
        now = (trainer.global_step, engine.step_count)
        self._uncounted += (now[0] - self._last[0]) - (now[1] - self._last[1])
        self._last = now
        if self._max_steps >= 0:
            trainer.fit_loop.epoch_loop.max_steps = self._max_steps + self._uncounted

    def _release_schedule(self, engine: GuardEngine) -> None:
        if self._held_schedule is None or engine.scheduler is None:
            return
        state, lrs = self._held_schedule
        self._held_schedule = None
        engine.scheduler.load_state_dict(state)
        for group, lr in zip(engine.optimizer.param_groups, lrs, strict=True):
            group["lr"] = lr

    def _stop(self, trainer: pl.Trainer, engine: GuardEngine) -> None:
        if not trainer.should_stop:  # the engine has logged the reason and what to try
            log.error("spikewatch stops the Lightning trainer: %s", engine.halt_reason)
        trainer.should_stop = True

    def _resume(self, state: dict[str, Any]) -> None:
        engine = self._engine()
        engine.load_guard_state(state["guard"])  # Lightning restored the live objects
        self._batches_seen = int(state["batches_seen"])

    def _engine(self) -> GuardEngine:
        if self.engine is None:
            raise RuntimeError(
                "SpikewatchCallback has no engine: it is built in on_train_start; "
                "pass the callback to L.Trainer(callbacks=[...]) and call trainer.fit"
            )
        return self.engine


def _unwrap(optimizer: Any) -> torch.optim.Optimizer:
    inner: torch.optim.Optimizer = (
        optimizer.optimizer if isinstance(optimizer, LightningOptimizer) else optimizer
    )
    return inner


def _check_setup(trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
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
    if trainer.accumulate_grad_batches != 1:
        raise bad_value(
            "accumulate_grad_batches",
            trainer.accumulate_grad_batches,
            "use 1 with SpikewatchCallback (a larger batch size instead): it decides "
            "per optimizer step and numbers batches one per step",
        )
