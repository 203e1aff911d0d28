"""Taps on a live ``transformers.Trainer``: every step's values, and the skip ledger.

A ``TrainerCallback`` sees neither the per-step loss nor the pre-clip grad norm (they
reach it only in ``on_log``, rounded, every ``logging_steps``), and it cannot drop a
batch. The Trainer computes all three on its own path, through methods it calls on
itself, so the taps replace those methods *on the one Trainer instance* (the class and
every other Trainer stay untouched) and put the originals back at train end:

- ``get_batch_samples``: the batches of one optimizer step come through a filter that
  numbers every batch the loader yields (its absolute data position) and drops the
  ones in the skip ledger, so they never reach forward or backward; with forensics
  (`hf.forensics`) each batch let through is handed to ``admit`` with its dataset
  indices (``samples``), to be kept for the probe, its quarantined rows dropped;
- ``training_step``: its return value (the micro-batch loss, detached, already scaled
  for gradient accumulation as the Trainer logs it) is summed over the step;
- ``_get_grad_norm``: its return value is the pre-clip norm the Trainer already
  computed on the device (with or without clipping).

Nothing here reads a value on the host: the tensors go to the guard's value pipe.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Any

import torch

from spikewatch_hooks.core.values import Number
from spikewatch_hooks.forensics.indices import SampleIndices
from spikewatch_hooks.state.ledger import SkipLedger

#: ``admit(position, batch, indices)``: the batch to train on, or None to pass it over.
Admit = Callable[[int, Any, "tuple[int, ...] | None"], Any]

log = logging.getLogger("spikewatch_hooks")

_TAPPED = ("get_batch_samples", "training_step", "_get_grad_norm")


class TrainerTaps:
    """Collects one optimizer step's loss, grad norm and data positions from a Trainer.

    Example:
        >>> taps = TrainerTaps(SkipLedger())
        >>> taps.ledger.add(1, 3)
        2
        >>> kept = list(taps.filter(iter("abcde")))  # positions 1 and 2 are dropped
        >>> kept, taps.positions, taps.next_position, taps.passed_over
        (['a', 'd', 'e'], [0, 3, 4], 5, 2)
    """

    def __init__(self, ledger: SkipLedger) -> None:
        self.ledger = ledger
        self.next_position = 0  # absolute position of the next batch the loader yields
        self.discard = 0  # batches already trained before a restart: drop them unseen
        self.passed_over = 0  # ledger batches dropped (not yet counted by the engine)
        self.positions: list[int] = []  # positions of the current step's batches
        self.loss: torch.Tensor | None = None
        self.grad_norm: Number | None = None
        self.unstepped = False  # micro-batches computed since the last optimizer step
        self.has_grad_norm = True
        self.samples: SampleIndices | None = None  # the loader's dataset indices, if known
        self.admit: Admit | None = None  # forensics: keep the batch, drop quarantined rows
        self._trainer: Any = None

    def filter(self, batches: Iterator[Any]) -> Iterator[Any]:
        """``batches`` without ledger positions; numbers every batch it reads."""
        return _LedgerFilter(batches, self)

    def start_step(self) -> None:
        """Forget the previous step's values (a new optimizer step's batches come)."""
        self.positions = []
        self.loss = None
        self.grad_norm = None

    # -- the Trainer ------------------------------------------------------------------
    def attach(self, trainer: Any) -> None:
        """Tap ``trainer`` (idempotent); `detach` undoes it."""
        self.detach()
        missing = [name for name in _TAPPED[:2] if not hasattr(trainer, name)]
        if missing:
            raise AttributeError(
                f"{type(trainer).__name__} has no {', '.join(missing)}: SpikewatchCallback "
                "needs transformers >= 4.46 (pip install -U transformers)"
            )
        self._trainer = trainer
        trainer.get_batch_samples = self._tap_batches(trainer.get_batch_samples)
        trainer.training_step = self._tap_loss(trainer.training_step)
        self.has_grad_norm = hasattr(trainer, "_get_grad_norm")
        if self.has_grad_norm:
            trainer._get_grad_norm = self._tap_grad_norm(trainer._get_grad_norm)
        else:  # fail open: loss-only detection beats no guard
            log.warning(
                "spikewatch: this transformers has no Trainer._get_grad_norm; the guard "
                "watches the loss only (upgrade transformers for grad-norm checks)"
            )

    def detach(self) -> None:
        """Put the Trainer's own methods back (the instance attributes go away)."""
        trainer, self._trainer = self._trainer, None
        if trainer is None:
            return
        for name in _TAPPED:
            trainer.__dict__.pop(name, None)

    def _tap_batches(self, original: Callable[..., Any]) -> Callable[..., Any]:
        def get_batch_samples(epoch_iterator: Iterator[Any], *args: Any, **kwargs: Any) -> Any:
            self.start_step()
            return original(self.filter(epoch_iterator), *args, **kwargs)

        return get_batch_samples

    def _tap_loss(self, original: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        def training_step(*args: Any, **kwargs: Any) -> torch.Tensor:
            loss = original(*args, **kwargs)
            # One device add per micro-batch (none without accumulation); no host read.
            self.loss = loss if self.loss is None else self.loss + loss
            self.unstepped = True
            return loss

        return training_step

    def _tap_grad_norm(self, original: Callable[..., Any]) -> Callable[..., Any]:
        def _get_grad_norm(*args: Any, **kwargs: Any) -> Any:
            self.grad_norm = original(*args, **kwargs)
            return self.grad_norm

        return _get_grad_norm


class _LedgerFilter:
    """An iterator over a Trainer's epoch iterator that drops ledger positions."""

    def __init__(self, batches: Iterator[Any], taps: TrainerTaps) -> None:
        self._batches, self._taps = batches, taps

    def __iter__(self) -> _LedgerFilter:
        return self

    def __next__(self) -> Any:
        taps = self._taps
        while True:
            batch = next(self._batches)  # StopIteration ends the epoch, as without us
            position = taps.next_position
            taps.next_position += 1
            # Read for every batch the loader yields, dropped or not: the n-th batch
            # holds the n-th index list drawn.
            indices = None if taps.samples is None else taps.samples.next_batch()
            if taps.discard > 0:
                taps.discard -= 1
                continue
            if position in taps.ledger:
                taps.passed_over += 1
                continue
            if taps.admit is not None:
                batch = taps.admit(position, batch, indices)
                if batch is None:  # every sample quarantined: passed over (counted)
                    continue
            taps.positions.append(position)
            return batch
