"""SpikeGuard in a hand-written loop with gradient accumulation of 4: one unit system.

``guard.step`` runs once per optimizer step; steps (``margin``, ``snapshot_every``,
``skip_ahead``) count optimizer steps and data positions count loader batches.
"""

from __future__ import annotations

import re

import pytest
import torch
from torch.nn import functional
from torch.utils.data import DataLoader, TensorDataset

from classify_task import held_out_loss, make_data, make_net, make_optimizer
from spikewatch.policy import PolicyConfig
from spikewatch.settings import MonitorConfig
from spikewatch_hooks.guard import SpikeGuard

ACCUMULATE, MICRO = 4, 64
STEPS = 200  # optimizer steps
POISON = range(640, 720)  # loader batches: optimizer steps [160, 180), 80 % of the way
DATA_BATCHES = STEPS * ACCUMULATE + 400  # headroom for the batches a rollback passes over
SKIP_AHEAD = 20  # optimizer steps: 80 loader batches


# These matrices are tiny; two OpenMP threads on a busy 2-core host run far slower.
pytestmark = pytest.mark.usefixtures("one_torch_thread")


class Run:
    """One training run's outcome."""

    def __init__(self, loss: float, guard: SpikeGuard | None, ledger_forwards: int) -> None:
        self.loss, self.guard, self.ledger_forwards = loss, guard, ledger_forwards


def train(data: TensorDataset, *, guarded: bool, accumulation_steps: int | None = None) -> Run:
    """STEPS optimizer steps of 4 micro-batches each, with or without the guard."""
    net = make_net()
    opt, sched = make_optimizer(net, STEPS)
    config = MonitorConfig(policy=PolicyConfig(margin=20, skip_ahead=SKIP_AHEAD))
    guard = None
    if guarded:
        guard = SpikeGuard(net, opt, sched, config=config, snapshot_every=10, keep_snapshots=8,
                           accumulation_steps=accumulation_steps)  # fmt: skip
    loader = DataLoader(data, batch_size=MICRO, shuffle=False)
    batches = guard.batches(loader) if guard is not None else iter(loader)
    ledger_forwards, total, steps = 0, torch.zeros(()), 0
    for i, (x, y) in enumerate(batches):
        if guard is not None:  # a forward on a batch the ledger already holds is waste
            ledger_forwards += guard.engine.position in guard.ledger
        loss = functional.cross_entropy(net(x), y) / ACCUMULATE
        loss.backward()  # type: ignore[no-untyped-call]
        total = total + loss.detach()
        if (i + 1) % ACCUMULATE:
            continue
        grad_norm = torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        if guard is not None:
            guard.step(loss=total, grad_norm=grad_norm)
        else:
            opt.step()
            sched.step()
        opt.zero_grad(set_to_none=True)
        total, steps = torch.zeros(()), steps + 1
        if (guard.step_count if guard is not None else steps) >= STEPS:
            break
    return Run(held_out_loss(net), guard, ledger_forwards)


@pytest.fixture(scope="module")
def clean() -> Run:
    return train(make_data(DATA_BATCHES, MICRO), guarded=False)


@pytest.mark.parametrize("accumulation_steps", [None, ACCUMULATE])
def test_poisoned_run_recovers_in_optimizer_step_units(
    clean: Run, accumulation_steps: int | None
) -> None:
    poisoned = make_data(DATA_BATCHES, MICRO, poison=POISON)
    unguarded = train(poisoned, guarded=False)
    run = train(poisoned, guarded=True, accumulation_steps=accumulation_steps)
    assert unguarded.loss >= 1.20 * clean.loss
    assert abs(run.loss - clean.loss) <= 0.05 * clean.loss
    assert run.guard is not None
    stats = run.guard.stats
    assert stats["rollbacks"] >= 1
    assert run.guard.step_count == STEPS  # optimizer steps, not micro-batches
    assert run.guard.engine.batches_per_step == ACCUMULATE
    [(start, stop)] = stats["skip_ledger"]
    assert start <= POISON.start and stop >= POISON.stop
    # Snapshots sit at optimizer-step boundaries: 4 loader batches per step before the
    # poison, so the ledger starts on a step boundary.
    assert start % ACCUMULATE == 0
    # skip_ahead counts optimizer steps: the ledger reaches SKIP_AHEAD * 4 batches past
    # the last batch consumed before the rollback (the rollback step's 4th).
    found = re.search(r"rollback at step (\d+)", run.guard.ledger.reasons[0])
    assert found is not None
    consumed_to = (int(found.group(1)) + 1) * ACCUMULATE
    assert stop == consumed_to + SKIP_AHEAD * ACCUMULATE
    assert run.ledger_forwards == 0


def test_healthy_twin_sees_no_rollback(clean: Run) -> None:
    run = train(make_data(DATA_BATCHES, MICRO), guarded=True)
    assert run.guard is not None
    stats = run.guard.stats
    assert (stats["rollbacks"], stats["skipped_steps"], stats["skipped_batches"]) == (0, 0, 0)
    assert run.guard.step_count == STEPS
    assert run.loss == pytest.approx(clean.loss, rel=1e-6)
