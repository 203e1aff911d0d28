"""`SpikeGuard`: the watchdog inside a hand-written training loop.

guard = SpikeGuard(model=model, optimizer=opt, scheduler=sched)
for batch in guard.batches(loader):
    loss = compute_loss(model, batch)
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    guard.step(loss=loss, grad_norm=grad_norm)   # optimizer.step() unless skipped
    opt.zero_grad(set_to_none=True)

Several optimizers and schedulers, and an fp16 GradScaler: see `core.updates`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import nn

from spikewatch.records import Decision
from spikewatch.settings import MonitorConfig
from spikewatch.transport import Transport
from spikewatch_hooks.core.accumulation import Accumulation
from spikewatch_hooks.core.checks import check_components
from spikewatch_hooks.core.feed import BatchFeed
from spikewatch_hooks.core.options import GuardOptions
from spikewatch_hooks.core.run_length import fit_to_run_length
from spikewatch_hooks.distributed.lockstep import Lockstep
from spikewatch_hooks.forensics.evaluate import ProbeLoss
from spikewatch_hooks.forensics.options import ForensicsOptions
from spikewatch_hooks.state.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from spikewatch_hooks.state.deep import DiskCheckpoints

log = logging.getLogger(__name__)
_B = TypeVar("_B")


class SpikeGuard:
    """Watches every step, skips bad updates, rolls back and skips bad batches.

    Args:
        model, optimizer, scheduler: the live training objects (scheduler optional);
            ``optimizer`` and ``scheduler`` may be lists, stepped together.
        scaler: an fp16 ``torch.amp.GradScaler`` the guard steps through; its overflow
            back-offs count in ``stats["scaler_backoffs"]``, not as incidents, until the
            scale collapses (`core.updates`).
        run_id: the run's name in incidents and metrics.
        config: detection and policy settings (`MonitorConfig`).
        snapshot_every: take an in-memory snapshot every this many optimizer steps
            (default 100; fitted to a short run when ``total_steps`` is given).
        keep_snapshots: how many snapshots the ring holds (memory: one copy of model and
            optimizer state each, on the CPU).
        transport: where records go; default: an embedded monitor (no server).
        monitor_url: also report to a `spikewatch serve` at this URL: this process's
            own monitor still decides every automatic action on the step it is for; the
            service stores records and decisions, alerts, hands the run its settings at
            start and sends operators' commands back (applied at a step boundary, on
            every rank). Under torch.distributed only rank 0 talks to it.
        token: the service's bearer token (default: ``$SPIKEWATCH_TOKEN``).
        checkpoint_dir / checkpoint_every: also write verified disk checkpoints, kept
            as "latest" and "good" (before an open incident) and used by a rollback the
            ring cannot reach back for (`state.deep`).
        margin: shortcut for ``config.policy.margin`` (roll back at least this many steps
            before the onset).
        distributed: decide in lockstep across the ranks of ``torch.distributed`` (one
            small all-gather per step); None: whenever a process group of > 1 rank exists.
        snapshot_split: None (default): DDP state is split across ranks, each keeping
            1/world_size of every snapshot (a rollback gathers the rest); False: full
            copies per rank; True: split any replicated lockstep model (README).
        snapshot_budget_bytes: cap on this rank's snapshot memory, reported as
            ``stats["snapshot_bytes"]``; too small for one snapshot: a ConfigError.
        snapshot_frozen: also snapshot parameters no optimizer updates (pass True, or
            give them a param group with lr=0, if your code edits frozen weights).
        accumulation_steps: loader batches per optimizer step (gradient accumulation),
            which turns ``skip_ahead`` (in optimizer steps) into batches; None: counted
            from the batches `batches` yields between two `step` calls.
        total_steps: the run's length in optimizer steps, when known: default rollback
            settings fit to it, explicit ones that would undo or skip a large share of
            it warn (`run_length.fit_to_run_length`).
        probe_loss: ``probe_loss(model, batch)`` -> the batch's loss per sample (shape
            [B]) or as a scalar, computed as in training: turns on forensics. After an
            automatic rollback the guard re-evaluates the suspect batches forward only
            from the restored state next to ordinary ones, and the verdict (``data``,
            ``state``, ``unknown``; ``stats["last_verdict"]``) decides the next step
            (``config.forensics``; README, "Forensics").
        quarantine_file: JSONL file where a ``data`` verdict's samples (by dataset
            index) are written; samples already in it are dropped from their batches.
        probe_cache_batches / probe_cache_bytes: how many recent batches (and bytes of
            them) the guard keeps for the probe (references, not copies).

    Units: ``step_count``, ``margin``, ``snapshot_every`` and ``skip_ahead`` count
    optimizer steps; data positions and ``skipped_batches`` count loader batches. With
    gradient accumulation call `step` once per optimizer step (README, "Units"); under
    accelerate's ``accumulate()`` a `step` while ``sync_gradients`` is False does nothing.

    Example:
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> model = nn.Linear(4, 1)
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.05)
        >>> guard = SpikeGuard(model=model, optimizer=opt, snapshot_every=10)
        >>> data = [torch.randn(8, 4) for _ in range(60)]
        >>> for x in guard.batches(data):
        ...     loss = model(x).pow(2).mean()
        ...     if guard.step_count == 30:
        ...         loss = loss * float("nan")       # a poisoned batch
        ...     loss.backward()
        ...     decision = guard.step(loss=loss)
        ...     opt.zero_grad(set_to_none=True)
        ...     if decision is not None:
        ...         print(decision.step, decision.action)
        30 skip_step
        >>> guard.stats["skipped_steps"], guard.stats["rollbacks"]
        (1, 0)
        >>> guard
        SpikeGuard(run_id='run', step=60, embedded, rollbacks=0, skipped_steps=1, halted=False)
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | Sequence[torch.optim.Optimizer],
        scheduler: Any = None,
        *,
        scaler: Any = None,
        run_id: str = "run",
        config: MonitorConfig | None = None,
        snapshot_every: int | None = None,
        keep_snapshots: int = 4,
        transport: Transport | None = None,
        monitor_url: str | None = None,
        token: str | None = None,
        checkpoint_dir: str | os.PathLike[str] | None = None,
        checkpoint_every: int = 0,
        margin: int | None = None,
        distributed: bool | None = None,
        snapshot_split: bool | None = None,
        snapshot_budget_bytes: int | None = None,
        snapshot_frozen: bool = False,
        accumulation_steps: int | None = None,
        total_steps: int | None = None,
        probe_loss: ProbeLoss | None = None,
        quarantine_file: str | os.PathLike[str] | None = None,
        probe_cache_batches: int = 64,
        probe_cache_bytes: int = 512 * 2**20,
    ) -> None:
        check_components(
            model=model,
            optimizer=optimizer,
            scheduler=scheduler,
            snapshot_every=100 if snapshot_every is None else snapshot_every,
            keep_snapshots=keep_snapshots,
            checkpoint_every=checkpoint_every,
            checkpoint_dir=checkpoint_dir,
        )
        forensics = ForensicsOptions(  # validated before the engine takes its snapshot
            probe_loss=probe_loss, quarantine_file=quarantine_file,
            probe_cache_batches=probe_cache_batches, probe_cache_bytes=probe_cache_bytes,
        )  # fmt: skip
        lockstep = None
        if distributed or (distributed is None and Lockstep.active()):
            lockstep = Lockstep()
        self.options = GuardOptions.build(
            run_id=run_id,
            config=config,
            snapshot_every=snapshot_every,
            keep_snapshots=keep_snapshots,
            margin=margin,
            transport=transport,
            monitor_url=monitor_url,
            token=token,
            snapshot_split=snapshot_split,
            snapshot_budget_bytes=snapshot_budget_bytes,
            snapshot_frozen=snapshot_frozen,
        )
        self.accumulation = Accumulation.build(accumulation_steps)
        self.options = fit_to_run_length(self.options, total_steps)
        self.run_id = run_id
        # Built before init_process_group (distributed=None): join the lockstep at the
        # first step, or ranks would decide alone and deadlock at their next collective.
        self.engine = self.options.engine(
            model,
            optimizer,
            scheduler,
            scaler=scaler,
            lockstep=lockstep,
            adopt_lockstep=distributed is None,
        )
        if checkpoint_dir is not None:
            self.engine.disk = DiskCheckpoints(checkpoint_dir)
        self.config = self.engine.config
        self.transport = self.engine.transport
        self.checkpoint_dir = checkpoint_dir
        self.checkpoint_every = checkpoint_every
        self.engine.batches_per_step = self.accumulation.batches_per_step
        self.engine.forensics = forensics.build(self.engine, probe_loss)
        self.feed = BatchFeed(self.engine, self.accumulation)

    def __repr__(self) -> str:
        e = self.engine
        mode = "service" if getattr(e.transport, "client", None) is not None else "embedded"
        ranks = "" if e.lockstep is None else f", rank {e.lockstep.rank}/{e.lockstep.world_size}"
        return (
            f"SpikeGuard(run_id={self.run_id!r}, step={e.step_count}, {mode}{ranks}, "
            f"rollbacks={e.stats['rollbacks']}, skipped_steps={e.stats['skipped_steps']}, "
            f"halted={e.halted})"
        )

    # -- the loop ---------------------------------------------------------------------
    def batches(self, loader: Iterable[_B]) -> Iterator[_B]:
        """Yield the loader's batches, skipping those in the skip ledger.

        Positions count every batch the loader yields from the start of the run (the
        same order on a restart: a seeded sampler), continuing across calls (one per
        epoch); after `resume` the batches before the checkpoint are passed over and
        the ledger's ranges stay skipped. With ``probe_loss``, recent batches are kept
        for the forensics probe and quarantined samples dropped (`core.feed`).
        """
        return self.feed.batches(loader)

    def accept(self, position: int) -> bool:
        """Whether to train on the batch at data ``position`` (for loops that do not
        iterate `batches`: Lightning's manual optimization, see the README). False when
        halted or in the skip ledger (counted); True records the next step there.

        Example:
            >>> model = nn.Linear(2, 1)
            >>> guard = SpikeGuard(model, torch.optim.SGD(model.parameters(), lr=0.1))
            >>> _ = guard.ledger.add(3, 5, reason="bad data")
            >>> [p for p in range(6) if guard.accept(p)], guard.stats["skipped_batches"]
            ([0, 1, 2, 5], 2)
        """
        return self.feed.accept(position)

    def step(
        self,
        loss: torch.Tensor | float,
        grad_norm: torch.Tensor | float | None = None,
        *,
        data_position: int | None = None,
    ) -> Decision | None:
        """Run ``optimizer.step()`` and ``scheduler.step()`` unless the guard decides
        otherwise; apply a rollback or halt here. Returns the step's most severe
        decision, or None when there is nothing to report."""
        if self.accumulation.micro_batch(self.engine):
            return None  # accelerate accumulate(): no optimizer step on this micro-batch
        decision = self.engine.step(loss, grad_norm, data_position)
        if (
            self.checkpoint_every
            and self.engine.step_count % self.checkpoint_every == 0
            and (decision is None or decision.action in ("watch", "skip_step"))
        ):
            self._auto_checkpoint()
        return decision

    # -- read-only views --------------------------------------------------------------
    @property
    def step_count(self) -> int:
        """Optimizer steps taken on the current branch (rewinds with a rollback)."""
        return self.engine.step_count

    @property
    def halted(self) -> bool:
        """True once the guard halted the run (``batches`` then stops)."""
        return self.engine.halted

    def close(self, timeout: float = 10.0) -> None:
        """Deliver the records still queued for a monitor service (no-op when embedded).

        Under torch.distributed every rank calls it: the last steps are gathered first.
        """
        self.engine.drain()
        close = getattr(self.transport, "close", None)
        if close is not None:
            close(timeout=timeout)

    @property
    def stats(self) -> dict[str, Any]:
        """Counters: rollbacks, skipped_steps, skipped_batches, incidents, halted, ..."""
        return self.engine.summary()

    @property
    def ledger(self) -> Any:
        """The `SkipLedger` of data positions never to train on."""
        return self.engine.ledger

    # -- disk checkpoints -------------------------------------------------------------
    def save_checkpoint(self, path: str | os.PathLike[str]) -> None:
        """Write model, optimizer, scheduler, RNG and guard state atomically to ``path``.

        One process: a single verified file (`checkpoint.save_checkpoint`). Under
        ``torch.distributed``, or when ``path`` is an existing folder: a sharded
        ``torch.distributed.checkpoint`` folder (`dist_checkpoint.save_distributed`),
        which every rank must write at the same step. Returns once it is on disk.
        """
        if self.engine.lockstep is not None or os.path.isdir(path):
            # Imported when first needed: torch.distributed.checkpoint takes ~1 s to import.
            from spikewatch_hooks.distributed.checkpoint import save_distributed  # noqa: PLC0415

            save_distributed(self.engine, path).result()
        else:
            save_checkpoint(path, self.engine.checkpoint_payload())

    def resume(self, path: str | os.PathLike[str]) -> None:
        """Load a checkpoint into the live objects; `batches` then continues after it.

        A folder is a distributed checkpoint (`dist_checkpoint.load_distributed`): it
        loads on the world size it was saved on, on another one, or in one process; the
        skip ledger, kept in global data positions, holds on every rank. A file is a
        single-process checkpoint.
        """
        if os.path.isdir(path):
            from spikewatch_hooks.distributed.checkpoint import load_distributed  # noqa: PLC0415

            guard = load_distributed(self.engine, path)
        else:
            payload = load_checkpoint(path)
            self.engine.load_checkpoint_payload(payload)
            guard = payload["guard"]
        self.feed.restart(int(guard["next_position"]))
        self.engine.count("resumes")

    def _auto_checkpoint(self) -> None:
        """Write ``spikewatch-latest.pt`` (one process) or the ``spikewatch-latest``
        folder (distributed: written in the background; the next save waits for it),
        keeping the one before an open incident as ``spikewatch-good`` (`state.deep`).
        A failed write is counted and logged; training goes on."""
        assert self.engine.disk is not None  # checked at construction
        path = self.engine.disk.paths(self.engine)[0]

        def report(done: Future[Path]) -> None:  # on the background writer's thread
            if done.exception() is not None:
                self.engine.count("checkpoint_failures")
                log.error(
                    "spikewatch could not write %s (%s); training continues", path, done.exception()
                )

        try:
            pending = self.engine.disk.save_auto(self.engine)
            if pending is not None:
                pending.add_done_callback(report)
        except (OSError, CheckpointError):
            self.engine.count("checkpoint_failures")
            log.exception("spikewatch could not write %s; training continues", path)
