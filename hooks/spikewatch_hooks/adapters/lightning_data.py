"""The Lightning training dataloader, numbered and with the skip ledger's batches left out.

`SpikewatchCallback` installs `LedgerLoader` around the trainer's training dataloader
at train start, so a batch in the skip ledger is never handed to ``training_step``: it
costs its loading, not a forward and backward. Lightning offers no public hook to
filter training batches (returning -1 from ``on_train_batch_start`` ends the epoch), so
the callback replaces the iterable of the fit loop's ``CombinedLoader`` (its public
``flattened`` setter) and restarts the fit loop's data fetcher on it; a Lightning whose
fit loop lacks those (or has several training dataloaders) falls back to dropping the
update of a ledger batch, which is then computed. With an unsized dataloader Lightning
fetches one batch ahead: the one batch fetched when a rollback fills the ledger is
computed and its update dropped the same way.

With forensics (`lightning_forensics`) each batch is read with its dataset indices, its
quarantined rows dropped, before it is handed on.

Positions count every batch the dataloader yields since the run began, across epochs.
On a resume from a mid-epoch checkpoint a plain dataloader starts its epoch again from
its first batch: the batches before the checkpoint are passed over, uncounted, so the
run continues at the batch after the checkpoint.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from spikewatch_hooks.core.engine import GuardEngine

if TYPE_CHECKING:
    from spikewatch_hooks.adapters.lightning_forensics import LightningForensics

log = logging.getLogger(__name__)


@dataclass(kw_only=True)
class DataPositions:
    """Where the training data stream is, in absolute batch positions.

    Example:
        >>> positions = DataPositions()
        >>> positions.restore({"next_position": 130, "epoch_start": 100})
        >>> positions.start_epoch(length=50), positions.resume_at
        (100, 130)
        >>> positions.restore({"next_position": 150, "epoch_start": 100})
        >>> positions.start_epoch(length=50)   # the checkpoint ended that epoch
        150
    """

    #: Position of the next batch the dataloader yields.
    cursor: int = 0
    #: Position of the first batch of the current epoch.
    epoch_start: int = 0
    #: After a resume: the positions before this one were trained before the checkpoint.
    resume_at: int = 0
    #: Positions handed to Lightning and not started yet (Lightning may fetch ahead).
    queue: deque[int] = field(default_factory=deque)
    #: The position after the last batch that reached ``training_step``.
    started: int = 0
    _resuming: bool = False

    def start_batch(self, *, wrapped: bool) -> int:
        """A batch reaches ``training_step``: its position (`LedgerLoader` queued it; a
        dataloader that is not wrapped hands every batch on, in order)."""
        position = self.queue.popleft() if wrapped and self.queue else self.started
        self.started = position + 1
        return position

    def start_epoch(self, length: int | None) -> int:
        """A new pass over the dataloader begins: the position of its first batch."""
        if self._resuming and (length is None or self.resume_at - self.epoch_start < length):
            self.cursor = self.epoch_start  # a plain dataloader restarts its epoch
        else:
            self.epoch_start = self.cursor = max(self.cursor, self.resume_at)
        self._resuming = False
        self.queue.clear()
        return self.epoch_start

    def restore(self, state: dict[str, Any]) -> None:
        """Continue from a checkpoint's `state_dict` (applied at the next epoch start)."""
        self.resume_at = self.cursor = int(state["next_position"])
        self.epoch_start = int(state.get("epoch_start", 0))
        self._resuming = True

    def resume(self, callback_state: dict[str, Any]) -> None:
        """Continue from the callback's saved `state_dict` (its ``batches_seen`` and
        ``positions``; an older state has no ``positions``)."""
        self.started = int(callback_state["batches_seen"])
        self.restore(callback_state.get("positions", {"next_position": self.started}))

    def state_dict(self, next_position: int) -> dict[str, int]:
        """Plain JSON state; ``next_position``: the batch after the last one trained."""
        return {"next_position": next_position, "epoch_start": self.epoch_start}


class LedgerLoader:
    """Wraps a training dataloader: numbers its batches and leaves out the ledger's.

    Its length is the wrapped loader's (an upper bound: Lightning then fetches one
    batch at a time, after the previous batch's rollback has filled the ledger); every
    other attribute (``sampler``, ``batch_size``, ...) is the wrapped loader's.

    Example:
        >>> import torch
        >>> from spikewatch_hooks.core.options import GuardOptions
        >>> model = torch.nn.Linear(2, 1)
        >>> engine = GuardOptions.build().engine(model, torch.optim.SGD(model.parameters()), None)
        >>> _ = engine.ledger.add(2, 4)
        >>> loader = LedgerLoader([10, 11, 12, 13, 14], engine, DataPositions())
        >>> list(loader), len(loader), engine.stats["skipped_batches"]
        ([10, 11, 14], 5, 2)
    """

    def __init__(
        self,
        loader: Any,
        engine: GuardEngine,
        positions: DataPositions,
        forensics: LightningForensics | None = None,
    ) -> None:
        self.loader, self.engine, self.positions = loader, engine, positions
        self.forensics = forensics

    def __len__(self) -> int:
        return len(self.loader)  # TypeError for an unsized loader, as Lightning expects

    def __getattr__(self, name: str) -> Any:
        if name in ("loader", "engine", "positions", "forensics"):  # not set yet (unpickle)
            raise AttributeError(name)
        return getattr(self.loader, name)

    def __iter__(self) -> Iterator[Any]:
        positions, engine = self.positions, self.engine
        try:
            length: int | None = len(self.loader)
        except TypeError:
            length = None
        positions.start_epoch(length)
        forensics = self.forensics
        batches = forensics.indexed(self.loader) if forensics else ((b, None) for b in self.loader)
        for batch, indices in batches:
            position = positions.cursor
            positions.cursor += 1
            if position < positions.resume_at:
                continue  # trained before the checkpoint this run resumed from
            if position in engine.ledger:
                engine.count("skipped_batches")
                continue
            kept = batch if forensics is None else forensics.admit(position, batch, indices)
            if kept is None:  # every sample quarantined (counted)
                continue
            positions.queue.append(position)
            yield kept


def install(
    trainer: Any,
    engine: GuardEngine,
    positions: DataPositions,
    forensics: LightningForensics | None = None,
) -> bool:
    """Put `LedgerLoader` around the fit loop's training dataloader; False when this
    Lightning's fit loop does not have the parts it needs (or several loaders)."""
    loop = trainer.fit_loop
    combined = getattr(loop, "_combined_loader", None)
    fetcher = getattr(loop, "_data_fetcher", None)
    flat = getattr(combined, "flattened", None)
    if combined is None or fetcher is None or not isinstance(flat, list) or len(flat) != 1:
        log.warning(
            "spikewatch: cannot wrap this Lightning's training dataloader; batches in the "
            "skip ledger will run forward and backward and their update will be dropped"
        )
        return False
    if forensics is not None:
        forensics.watch(flat[0])  # before the fresh iterator below: its pass is recorded
    combined.flattened = [LedgerLoader(flat[0], engine, positions, forensics)]
    fetcher.setup(combined)
    iter(fetcher)  # a fresh iterator, on the wrapped loader
    return True
