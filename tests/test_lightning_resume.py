"""A Lightning run rolled back, checkpointed, killed and resumed with ``ckpt_path=``.

Real training on CPU. The resumed run keeps the skip ledger and the data position,
trains no batch twice and none in the ledger, and ends where the uninterrupted guarded
run ends.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("lightning")

import lightning.pytorch as pl
import torch

from classify_task import held_out_loss
from lightning_task import Numbered, loader, make_trainer, numbered_data
from spikewatch.policy import PolicyConfig
from spikewatch.settings import MonitorConfig
from spikewatch_hooks.adapters.lightning import SpikewatchCallback

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*does not have many workers:UserWarning"),
    pytest.mark.filterwarnings("ignore:.*LeafSpec.*:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:.*LeafSpec.*:FutureWarning"),
    pytest.mark.filterwarnings("ignore:.*dataloader is\\s+not resumable"),
]

BATCH, STEPS = 256, 300
POISON = range(240, 270)
DATA_BATCHES = STEPS + 200
ACCUMULATE = [1, 4]


@pytest.fixture(autouse=True, scope="module")
def _torch_settings() -> Iterator[None]:
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(deterministic)


class KilledError(RuntimeError):
    """The process died (what the test simulates)."""


class SaveThenKill(pl.Callback):
    """A checkpoint a few steps after the first rollback, then a crash a few steps later."""

    def __init__(self, guard: SpikewatchCallback, path: Path) -> None:
        self.guard, self.path = guard, path
        self.saved_at: int | None = None
        self._rolled_at = 0  # the global step at which the first rollback happened
        self.saved_state: dict[str, Any] = {}

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        if self.saved_at is None and self.guard.stats["rollbacks"] and self._boundary(trainer):
            if trainer.global_step >= self._rolled_at + 5:
                trainer.save_checkpoint(self.path)
                self.saved_at, self.saved_state = trainer.global_step, self.guard.state_dict()
        elif self.saved_at is not None and trainer.global_step >= self.saved_at + 10:
            raise KilledError("simulated crash after the checkpoint")
        if not self.guard.stats["rollbacks"]:
            self._rolled_at = trainer.global_step

    @staticmethod
    def _boundary(trainer: pl.Trainer) -> bool:
        """An optimizer step just ended (where ModelCheckpoint saves, too)."""
        return not trainer.fit_loop.epoch_loop._should_accumulate()


def guard() -> SpikewatchCallback:
    config = MonitorConfig(policy=PolicyConfig(margin=20, skip_ahead=30))
    return SpikewatchCallback(config=config, snapshot_every=10, keep_snapshots=8)


def fit(
    callbacks: list[pl.Callback], model: Numbered, accumulate: int, ckpt: Path | None = None
) -> pl.Trainer:
    micro = BATCH // accumulate  # the same optimizer steps, in `accumulate` micro-batches
    trainer = make_trainer(callbacks, max_steps=STEPS, accumulate_grad_batches=accumulate)
    data = numbered_data(DATA_BATCHES * accumulate, micro, poison=_poison(accumulate))
    trainer.fit(model, loader(data, micro), ckpt_path=ckpt)
    return trainer


def _poison(accumulate: int) -> range:
    return range(POISON.start * accumulate, POISON.stop * accumulate)


@pytest.mark.parametrize("accumulate", ACCUMULATE)
def test_resumed_run_ends_like_the_uninterrupted_one(tmp_path: Path, accumulate: int) -> None:
    steps = STEPS
    whole_guard = guard()
    whole = Numbered(steps=steps, watch=whole_guard)
    fit([whole_guard], whole, accumulate)
    assert whole_guard.stats["rollbacks"] == 1

    first_guard = guard()
    saver = SaveThenKill(first_guard, tmp_path / "after-rollback.ckpt")
    with pytest.raises(KilledError):
        fit([first_guard, saver], Numbered(steps=steps, watch=first_guard), accumulate)
    assert saver.saved_at is not None

    resumed_guard = guard()
    resumed = Numbered(steps=steps, watch=resumed_guard)
    fit([resumed_guard], resumed, accumulate, ckpt=saver.path)

    expected = held_out_loss(whole.net)
    assert abs(held_out_loss(resumed.net) - expected) <= 0.01 * expected
    assert resumed_guard.step_count == whole_guard.step_count == steps
    assert resumed_guard.stats["skip_ledger"] == whole_guard.stats["skip_ledger"]
    assert resumed_guard.stats["rollbacks"] == 1
    # No batch in the ledger, none trained before the checkpoint, none twice.
    assert resumed.ledger_forwards == 0
    [(start, stop)] = resumed_guard.stats["skip_ledger"]
    assert not [p for p in resumed.forwarded if start <= p < stop]
    assert min(resumed.forwarded) == saver.saved_state["positions"]["next_position"]
    assert len(set(resumed.forwarded)) == len(resumed.forwarded)
    # Together, the two halves trained exactly what the uninterrupted run trained.
    before = [p for p in whole.forwarded if p < min(resumed.forwarded)]
    assert before + resumed.forwarded == whole.forwarded
