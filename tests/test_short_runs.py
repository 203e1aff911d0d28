"""Short runs: rollback settings fitted to a known run length, or a warning at construction.

A 300-step run with 30 bad batches, real training of a small MLP on CPU. With the
100-step defaults a rollback undoes a large share of the run; with ``total_steps=300``
the defaults fit the run and the guard rolls back no further than it needs.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch.nn import functional
from torch.utils.data import DataLoader, TensorDataset

from classify_task import held_out_loss, make_data, make_net, make_optimizer
from spikewatch.errors import ConfigError
from spikewatch.policy import PolicyConfig
from spikewatch.settings import MonitorConfig
from spikewatch_hooks.core.options import GuardOptions
from spikewatch_hooks.core.run_length import RunLengthWarning, check_run_length, fit_to_run_length
from spikewatch_hooks.guard import SpikeGuard

STEPS, BATCH = 300, 256
POISON = range(240, 270)  # 30 bad batches, 80 % of the way through
DATA_BATCHES = STEPS + 300


# These matrices are tiny; two OpenMP threads on a busy 2-core host run far slower.
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def train(data: TensorDataset, **guard_options: object) -> tuple[float, SpikeGuard | None]:
    """STEPS optimizer steps; a SpikeGuard when guard_options are given."""
    net = make_net()
    opt, sched = make_optimizer(net, STEPS)
    guard = SpikeGuard(net, opt, sched, **guard_options) if guard_options else None  # type: ignore[arg-type]
    loader = DataLoader(data, batch_size=BATCH, shuffle=False)
    for step, (x, y) in enumerate(guard.batches(loader) if guard else loader):
        loss = functional.cross_entropy(net(x), y)
        loss.backward()  # type: ignore[no-untyped-call]
        grad_norm = torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        if guard is not None:
            guard.step(loss=loss, grad_norm=grad_norm)
        else:
            opt.step()
            sched.step()
        opt.zero_grad(set_to_none=True)
        if (guard.step_count if guard else step + 1) >= STEPS:
            break
    return held_out_loss(net), guard


@pytest.fixture(scope="module")
def clean_loss() -> float:
    return train(make_data(DATA_BATCHES, BATCH))[0]


def test_defaults_fitted_to_a_300_step_run_roll_back_only_as_far_as_needed(
    clean_loss: float,
) -> None:
    poisoned = make_data(DATA_BATCHES, BATCH, poison=POISON)
    unguarded, _ = train(poisoned)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RunLengthWarning)  # fitted defaults: no warning
        fitted, guard = train(poisoned, total_steps=STEPS)
    assert guard is not None
    policy = guard.config.policy
    assert (policy.margin, policy.skip_ahead, guard.engine.snapshot_every) == (15, 30, 11)
    assert unguarded >= 1.20 * clean_loss
    assert abs(fitted - clean_loss) <= 0.05 * clean_loss
    assert guard.stats["rollbacks"] >= 1
    [(start, stop)] = guard.stats["skip_ledger"]
    assert start <= POISON.start and stop >= POISON.stop
    # No further back than the margin and one snapshot interval before the onset, and
    # no more than skip_ahead past the batches consumed.
    assert POISON.start - start <= policy.margin + guard.engine.snapshot_every
    assert guard.stats["skipped_batches"] <= 2 * len(POISON) + 2 * 30 + 15 + 11


def test_unfitted_defaults_roll_back_a_large_share(clean_loss: float) -> None:
    """What total_steps prevents: the 100-step defaults on the same 300-step run."""
    _, guard = train(make_data(DATA_BATCHES, BATCH, poison=POISON), run_id="unfitted")
    assert guard is not None and guard.stats["rollbacks"] >= 1
    [(start, _)] = guard.stats["skip_ledger"]
    assert POISON.start - start >= 100


def test_explicit_settings_out_of_proportion_warn_at_construction() -> None:
    net = make_net()
    opt, _ = make_optimizer(net, STEPS)
    with pytest.warns(RunLengthWarning, match=r"margin=100 with snapshot_every=50 .*300 steps"):
        guard = SpikeGuard(net, opt, margin=100, snapshot_every=50, total_steps=STEPS)
    assert guard.config.policy.margin == 100  # given settings are kept
    config = MonitorConfig(policy=PolicyConfig(margin=10, skip_ahead=200))
    with pytest.warns(RunLengthWarning, match=r"skip_ahead=200 .*pass skip_ahead=30"):
        SpikeGuard(net, opt, config=config, snapshot_every=5, total_steps=STEPS)


def test_long_runs_keep_the_defaults() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opts = fit_to_run_length(GuardOptions.build(), 20_000)
    assert (opts.config.policy.margin, opts.config.policy.skip_ahead, opts.snapshot_every) == (
        100,
        100,
        100,
    )


@pytest.mark.parametrize(
    ("total", "expected"),
    [(300, (30, 15, 30, 11)), (40, (4, 2, 4, 1)), (1, (1, 1, 1, 1)), (1000, (100, 50, 100, 37))],
)
def test_check_run_length_suggests_settings_within_the_budget(
    total: int, expected: tuple[int, int, int, int]
) -> None:
    check = check_run_length(
        total, margin=100, skip_ahead=100, snapshot_every=100, keep_snapshots=4
    )
    assert (check.budget, check.margin, check.skip_ahead, check.snapshot_every) == expected
    again = check_run_length(
        total, margin=check.margin, skip_ahead=check.skip_ahead,
        snapshot_every=check.snapshot_every, keep_snapshots=4,
    )  # fmt: skip
    assert check.margin + check.snapshot_every <= max(check.budget, 2)
    assert again.problems == () or total < 4


def test_bad_total_steps_names_the_field() -> None:
    net = make_net()
    opt, _ = make_optimizer(net, STEPS)
    with pytest.raises(ConfigError, match="total_steps=0 is invalid"):
        SpikeGuard(net, opt, total_steps=0)
