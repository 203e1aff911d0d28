"""The batches a hand-written loop trains on: positions, skip ledger, quarantine, cache.

Positions count every batch the loaders yield from the start of the run, across
calls of `SpikeGuard.batches` (one per epoch), so the ledger's ranges never fall on
another epoch's batches; `resume` starts counting again from the run's first batch
(the loader is iterated from the start and the batches before the checkpoint passed
over). With forensics, each batch trained on is kept in the probe's cache with its
dataset indices (`forensics.indices`), and quarantined samples are dropped from their
batch (a batch with no per-sample rows to drop them from is skipped whole).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from contextlib import nullcontext
from typing import TYPE_CHECKING, Any, TypeVar

from spikewatch_hooks.forensics.indices import recording

if TYPE_CHECKING:
    from spikewatch_hooks.core.accumulation import Accumulation
    from spikewatch_hooks.core.engine import GuardEngine

log = logging.getLogger("spikewatch_hooks")
_B = TypeVar("_B")


class BatchFeed:
    """`SpikeGuard.batches` and `SpikeGuard.accept` (see the module docstring)."""

    def __init__(self, engine: GuardEngine, accumulation: Accumulation) -> None:
        self.engine, self.accumulation = engine, accumulation
        self.resume_position = 0  # batches before it were trained on before a restart
        self.next_position = 0

    def restart(self, resume_position: int) -> None:
        """After `resume`: the loader is iterated from the run's first batch again."""
        self.resume_position, self.next_position = resume_position, 0

    def batches(self, loader: Iterable[_B]) -> Iterator[_B]:
        """Yield ``loader``'s batches that are to be trained on."""
        forensics = self.engine.forensics
        record = recording(loader) if forensics is not None else nullcontext(None)
        with record as seen:
            for batch in loader:
                position = self.next_position
                self.next_position += 1
                indices = None if seen is None else seen.next_batch()
                if self.engine.halted:
                    return
                kept = self._admit(position, batch, indices)
                if kept is not None:
                    yield kept

    def _admit(self, position: int, batch: Any, indices: tuple[int, ...] | None) -> Any:
        engine = self.engine
        if position < self.resume_position:
            return None
        if position in engine.ledger:
            engine.count("skipped_batches")
            return None
        forensics = engine.forensics
        if forensics is not None:
            batch, indices = forensics.unquarantined(engine, batch, indices)
            if batch is None:
                return None
        engine.position = position
        self.accumulation.yielded += 1
        if forensics is not None:
            forensics.remember(engine, batch, indices)
        return batch

    def accept(self, position: int) -> bool:
        """Whether to train on the batch at ``position`` (see `SpikeGuard.accept`)."""
        engine = self.engine
        if engine.halted:
            return False
        if position in engine.ledger:
            engine.count("skipped_batches")
            return False
        engine.position = position
        self.accumulation.yielded += 1  # as `batches` counts: batches per optimizer step
        return True
