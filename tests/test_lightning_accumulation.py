"""SpikewatchCallback with ``accumulate_grad_batches=4``: real Lightning training on CPU.

Steps count optimizer steps, data positions count loader batches; batches in the skip
ledger never reach ``training_step``.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import pytest

pytest.importorskip("lightning")

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
]

ACCUMULATE, MICRO = 4, 64
STEPS = 200  # optimizer steps
POISON = range(640, 720)  # loader batches: optimizer steps [160, 180)
DATA_BATCHES = STEPS * ACCUMULATE + 400
SKIP_AHEAD = 20  # optimizer steps


@pytest.fixture(autouse=True, scope="module")
def _torch_settings() -> Iterator[None]:
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(deterministic)


def fit(poison: range, *, guarded: bool) -> tuple[Numbered, SpikewatchCallback | None, int]:
    """STEPS optimizer steps of 4 micro-batches; returns module, callback, global_step."""
    callback = None
    if guarded:
        config = MonitorConfig(policy=PolicyConfig(margin=20, skip_ahead=SKIP_AHEAD))
        callback = SpikewatchCallback(config=config, snapshot_every=10, keep_snapshots=8)
    model = Numbered(steps=STEPS, watch=callback)
    trainer = make_trainer([] if callback is None else [callback], max_steps=STEPS,
                           accumulate_grad_batches=ACCUMULATE)  # fmt: skip
    trainer.fit(model, loader(numbered_data(DATA_BATCHES, MICRO, poison=poison), MICRO))
    return model, callback, trainer.global_step


@pytest.fixture(scope="module")
def clean_loss() -> float:
    model, _, _ = fit(range(0), guarded=False)
    return held_out_loss(model.net)


def test_poisoned_run_recovers_and_ledger_batches_are_never_computed(
    clean_loss: float, caplog: pytest.LogCaptureFixture
) -> None:
    unguarded, _, _ = fit(POISON, guarded=False)
    model, callback, global_step = fit(POISON, guarded=True)
    assert callback is not None
    assert held_out_loss(unguarded.net) >= 1.20 * clean_loss
    assert abs(held_out_loss(model.net) - clean_loss) <= 0.05 * clean_loss
    stats = callback.stats
    assert stats["rollbacks"] >= 1
    assert callback.step_count == STEPS  # optimizer steps
    [(start, stop)] = stats["skip_ledger"]
    assert start <= POISON.start and stop >= POISON.stop
    assert start % ACCUMULATE == 0  # snapshots sit on optimizer-step boundaries
    found = re.search(r"rolled back from step (\d+) to step (\d+)", caplog.text)
    assert found is not None, caplog.text
    rolled_from, rolled_to = int(found.group(1)), int(found.group(2))
    # skip_ahead counts optimizer steps: 20 steps of 4 batches past the last one consumed
    assert stop == (rolled_from + 1) * ACCUMULATE + SKIP_AHEAD * ACCUMULATE
    # Ledger batches never reach training_step: no forward on them, none twice, and
    # Lightning stepped only for the useful steps and the ones the rollback undid.
    assert model.ledger_forwards == 0
    assert len(set(model.forwarded)) == len(model.forwarded)
    assert stats["skipped_batches"] == stop - start
    assert global_step == STEPS + (rolled_from + 1 - rolled_to)
    assert len(model.forwarded) == ACCUMULATE * global_step


def test_healthy_twin_is_left_alone(clean_loss: float) -> None:
    model, callback, global_step = fit(range(0), guarded=True)
    assert callback is not None
    stats = callback.stats
    assert (stats["rollbacks"], stats["skipped_steps"], stats["skipped_batches"]) == (0, 0, 0)
    assert global_step == callback.step_count == STEPS
    assert callback.engine is not None and callback.engine.batches_per_step == ACCUMULATE
    assert held_out_loss(model.net) == pytest.approx(clean_loss, rel=1e-6)
