"""Forensics under the HF ``Trainer``: the probe's batches, their dataset indices, quarantine.

- Batches: the ``get_batch_samples`` tap (`taps`) hands every micro-batch it lets
  through to `TrainerForensics.admit`, with its data position, before its forward:
  exactly the micro-batches trained on (with gradient accumulation, several positions
  per optimizer step). A mapping batch is kept as a shallow copy (the Trainer pops
  ``labels`` off its inputs under label smoothing); its tensors are not copied.
- Dataset indices: at train start the prepared train dataloader's batch sampler (that
  of the torch DataLoader inside accelerate's ``DataLoaderShard``; under
  torch.distributed its ``BatchSamplerShard``, so each rank notes its own shard) gets
  the pass-through recorder of `forensics.indices`: the data order does not change. A
  resumed epoch's loader (``Trainer.get_resumed_dataloader``, tapped) draws the batches
  trained before the checkpoint through the recorder and never yields them: they are
  left out of the epoch's log. A loader that is not a map-style DataLoader, or a resumed
  run on a transformers without ``get_resumed_dataloader`` (it skips batches out of
  sight), or accelerate's ``dispatch_batches`` (rank 0 slices whole batches), names
  samples by position and row only (index None).
- Quarantine: the quarantined samples' rows are dropped before the Trainer counts the
  step's items (``num_items_in_batch``); a batch with nothing left is passed over like a
  ledger batch, and the step takes the next one.
"""

from __future__ import annotations

import copy
import logging
from collections import UserDict
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from torch import nn

from spikewatch_hooks.adapters.hf.probe_loss import derived_probe_loss, head_of
from spikewatch_hooks.forensics import indices
from spikewatch_hooks.forensics.indices import SampleIndices
from spikewatch_hooks.forensics.options import ForensicsOptions
from spikewatch_hooks.forensics.probe import Forensics

if TYPE_CHECKING:
    from spikewatch_hooks.adapters.hf.taps import TrainerTaps
    from spikewatch_hooks.core.engine import GuardEngine

log = logging.getLogger("spikewatch_hooks")

_RESUMED = "get_resumed_dataloader"


class TrainerForensics:
    """The probe's side of one ``trainer.train()``: `start` it, `stop` it at train end.

    Args:
        engine: the callback's engine (its ``forensics`` is set).
        forensics: the probe, its cache and the quarantine.
        loader: the torch DataLoader whose batch sampler is recorded (None: indices
            unknown).
    """

    def __init__(self, engine: GuardEngine, forensics: Forensics, loader: Any) -> None:
        self.engine, self.forensics = engine, forensics
        self.loader = loader
        self.seen: SampleIndices | None = None if loader is None else indices.attach(loader)
        self._trainer: Any = None

    @classmethod
    def start(
        cls,
        engine: GuardEngine,
        options: ForensicsOptions,
        *,
        trainer: Any,
        train_dataloader: Any,
        taps: TrainerTaps,
        resumed: bool,
    ) -> TrainerForensics | None:
        """Set up forensics for this run (None when it is off); the taps feed it."""
        probe_loss = options.probe_loss or _derived(engine.model, options)
        forensics = options.build(engine, probe_loss)
        if forensics is None:
            return None
        loader = _torch_loader(train_dataloader)
        if resumed and not hasattr(trainer, _RESUMED):
            loader = None  # the Trainer skips the resumed epoch's batches out of sight
        made = cls(engine, forensics, loader)
        engine.forensics = forensics
        taps.samples, taps.admit = made.seen, made.admit
        made._tap_resume(trainer)
        if made.seen is None and engine.reporting:
            log.info("spikewatch forensics: the train dataloader's dataset indices are "
                     "unknown here; samples are named by data position and row")  # fmt: skip
        return made

    def admit(self, position: int, batch: Any, sample_indices: tuple[int, ...] | None) -> Any:
        """The batch at ``position`` as it is to be trained on (None: skip it whole)."""
        forensics, engine = self.forensics, self.engine
        batch, sample_indices = forensics.unquarantined(engine, batch, sample_indices)
        if batch is None:
            return None
        kept = copy.copy(batch) if isinstance(batch, dict | UserDict) else batch
        forensics.remember(engine, kept, sample_indices, position=position)
        return batch

    def stop(self) -> None:
        """Train end: the loader's own batch sampler and the Trainer's method back."""
        if self.loader is not None:
            indices.detach(self.loader)
        if self._trainer is not None:
            self._trainer.__dict__.pop(_RESUMED, None)
            self._trainer = None

    def _tap_resume(self, trainer: Any) -> None:
        original = getattr(trainer, _RESUMED, None)
        if self.seen is None or original is None:
            return
        self._trainer = trainer
        trainer.get_resumed_dataloader = self._resume_tap(original, self.seen)

    @staticmethod
    def _resume_tap(original: Callable[..., Any], seen: SampleIndices) -> Callable[..., Any]:
        def get_resumed_dataloader(dataloader: Any, num_batches: int, *a: Any, **k: Any) -> Any:
            resumed = original(dataloader, num_batches, *a, **k)
            sampler = getattr(_torch_loader(resumed), "batch_sampler", None)
            if indices.draws_through(sampler, seen):  # accelerate's SkipBatchSampler does
                seen.skip_next_pass(int(num_batches))
            return resumed

        return get_resumed_dataloader


def _derived(model: nn.Module, options: ForensicsOptions) -> Any:
    if options.forensics and head_of(model) is None:
        log.warning(
            "spikewatch forensics: no per-sample loss can be derived for %s (causal-LM and "
            "sequence-classification heads only): verdicts will be 'unknown' until "
            "SpikewatchCallback(probe_loss=...) is given one",
            type(model).__name__,
        )
    return derived_probe_loss(model)


def _torch_loader(loader: Any) -> Any:
    """The torch DataLoader that draws the batches: accelerate's adapters
    (``DataLoaderShard``) keep it as ``base_dataloader`` and forward attributes to it.
    None for accelerate's ``DataLoaderDispatcher`` (``dispatch_batches``): rank 0 draws
    whole batches and hands each rank a slice, so no rank's indices match its rows."""
    if loader is None or type(loader).__name__ == "DataLoaderDispatcher":
        return None
    return vars(loader).get("base_dataloader", loader) if hasattr(loader, "__dict__") else loader
