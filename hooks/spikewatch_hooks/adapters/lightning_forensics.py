"""Forensics under Lightning: the probe's loss, its batches and their dataset indices.

- The loss: ``probe_loss`` given to the callback, else the LightningModule's own
  ``probe_loss(batch)`` method (per-sample losses [B] or a scalar, computed as in
  ``training_step``); with neither, forensics is off (a logged note), unless a
  quarantine file is given (its samples are still dropped).
- Indices: when the training dataloader is a map-style torch DataLoader, `LedgerLoader`
  (`lightning_data`) reads each batch with its dataset indices from the pass-through
  recorder of `forensics.indices` on its batch sampler (the data order is unchanged);
  the indices come from the pass that `LedgerLoader` itself began, so another loop
  iterating the same DataLoader object (validation on the training loader) cannot
  mix its batches in. Any other loader: None (samples named by position and row).
- Quarantine: `LedgerLoader` drops the quarantined samples' rows before Lightning sees
  the batch; a batch with none left is passed over.
- Batches: kept at ``on_train_batch_start``, as ``training_step`` gets them (on their
  device), at the optimizer step they are trained at (the loader may yield a batch
  while the one before it is still being trained: Lightning fetches ahead).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn

from spikewatch_hooks.core.engine import GuardEngine
from spikewatch_hooks.forensics import indices
from spikewatch_hooks.forensics.indices import SampleIndices
from spikewatch_hooks.forensics.options import ForensicsOptions
from spikewatch_hooks.forensics.probe import Forensics

log = logging.getLogger("spikewatch_hooks")

Indexed = tuple[Any, "tuple[int, ...] | None"]


class LightningForensics:
    """The probe's side of one ``trainer.fit``: `start` it, `stop` it at train end.

    Example:
        >>> from torch.utils.data import DataLoader
        >>> from spikewatch_hooks.core.options import GuardOptions
        >>> class Module(pl.LightningModule):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.net = torch.nn.Linear(2, 1)
        ...     def probe_loss(self, batch):
        ...         return (self.net(batch) ** 2).mean(dim=1)
        >>> module = Module()
        >>> engine = GuardOptions.build().engine(
        ...     module, torch.optim.SGD(module.parameters()), None)
        >>> forensics = LightningForensics.start(engine, ForensicsOptions(), module)
        >>> loader = DataLoader(torch.zeros(6, 2), batch_size=4)
        >>> forensics.watch(loader)
        >>> [(tuple(b.shape), i) for b, i in forensics.indexed(loader)]
        [((4, 2), (0, 1, 2, 3)), ((2, 2), (4, 5))]
    """

    def __init__(self, engine: GuardEngine, forensics: Forensics) -> None:
        self.engine, self.forensics = engine, forensics
        self.seen: SampleIndices | None = None
        self._loader: Any = None
        self._pending: dict[int, tuple[int, ...] | None] = {}  # yielded, not started yet

    @classmethod
    def start(
        cls, engine: GuardEngine, options: ForensicsOptions, pl_module: pl.LightningModule
    ) -> LightningForensics | None:
        """The run's forensics, set on the engine (None when off: see the module docstring)."""
        probe_loss = options.probe_loss
        if probe_loss is None and callable(getattr(pl_module, "probe_loss", None)):
            probe_loss = module_probe_loss
        if probe_loss is None and options.forensics and engine.reporting:
            log.info(
                "spikewatch forensics is off: %s has no probe_loss(batch) method and no "
                "probe_loss was given to SpikewatchCallback (add one returning the "
                "per-sample losses to probe rollbacks: data or state?)",
                type(pl_module).__name__,
            )
        forensics = options.build(engine, probe_loss)
        if forensics is None:
            return None
        engine.forensics = forensics
        return cls(engine, forensics)

    def watch(self, loader: Any) -> None:
        """Record the dataset indices of ``loader`` (the training DataLoader) from now on."""
        self.seen = indices.attach(loader)
        self._loader = loader if self.seen is not None else None

    def indexed(self, loader: Iterable[Any]) -> Iterator[Indexed]:
        """``loader``'s batches, each with its dataset indices (None: unknown)."""
        seen = self.seen
        before = -1 if seen is None else seen.passes
        iterator = iter(loader)
        # The pass this iter() began (none: an iterator made before `watch`, or another
        # loader): its log pairs batches and indices, whoever else iterates the loader.
        log_of_pass = seen.log if seen is not None and seen.passes > before else None
        for batch in iterator:
            yield batch, None if log_of_pass is None else log_of_pass.next_batch()

    def admit(self, position: int, batch: Any, sample_indices: tuple[int, ...] | None) -> Any:
        """The batch at ``position`` without its quarantined rows (None: skip it whole)."""
        batch, sample_indices = self.forensics.unquarantined(self.engine, batch, sample_indices)
        if batch is None:
            return None
        self._pending[position] = sample_indices
        return batch

    def remember(self, position: int, batch: Any) -> None:
        """``training_step`` gets the batch at ``position`` now: keep it for the probe."""
        sample_indices = self._pending.pop(position, None)
        for stale in [p for p in self._pending if p < position]:  # yielded, never trained
            del self._pending[stale]
        self.forensics.remember(self.engine, batch, sample_indices, position=position)

    def stop(self) -> None:
        """Train end: the DataLoader's own batch sampler back."""
        if self._loader is not None:
            indices.detach(self._loader)
            self._loader = None


def module_probe_loss(model: nn.Module, batch: Any) -> torch.Tensor:
    """The LightningModule's own ``probe_loss(batch)``."""
    loss: torch.Tensor = model.probe_loss(batch)  # type: ignore[operator]
    return loss
