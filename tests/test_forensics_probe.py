"""The probe in a hand-written loop: it changes nothing it should not, fails open, and
reads the batches it needs (map-style indices, iterable loaders, a bounded cache)."""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from spikewatch.forensics.verdict import ForensicsConfig
from spikewatch.policy import PolicyConfig
from spikewatch.records import Decision, Signal
from spikewatch.settings import MonitorConfig
from spikewatch_hooks.guard import SpikeGuard

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class Rows(Dataset[tuple[torch.Tensor, torch.Tensor, int]]):
    """Sample i: features, a target, and i itself (so a test can see the order)."""

    def __init__(self, n: int = 640, bad: frozenset[int] = frozenset()) -> None:
        g = torch.Generator().manual_seed(3)
        self.x = torch.randn(n, 8, generator=g)
        self.y = self.x @ torch.linspace(-1, 1, 8) + 0.1 * torch.randn(n, generator=g)
        self.bad = bad

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        y = self.y[i] + (40.0 if i in self.bad else 0.0)  # a corrupted label
        return self.x[i], y, i


def make_model() -> nn.Module:
    torch.manual_seed(0)
    # Dropout draws random numbers and BatchNorm updates buffers in train mode: the
    # probe must leave both exactly as a run without it would.
    return nn.Sequential(nn.Linear(8, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Dropout(0.2),
                         nn.Linear(32, 1))  # fmt: skip


def sample_loss(model: nn.Module, batch: Any) -> torch.Tensor:
    x, y, _ = batch
    out: torch.Tensor = (model(x).squeeze(-1) - y).pow(2)
    return out


def rollback(guard: SpikeGuard, onset: int) -> Decision:
    """The decision the monitor takes for a level shift at ``onset`` (detected now)."""
    step = guard.step_count
    signal = Signal(run="run", kind="level_shift", metric="loss", step=step, value=9.0,
                    score=20.0, baseline=1.0, onset_step=onset, peak_step=onset,
                    transient=False, stage="confirmed", incident=f"loss-spike-{onset}")  # fmt: skip
    return Decision(run="run", step=step, action="rollback", reason="test",
                    signal=signal, rollback_before_step=onset - 10, skip_ahead=5)  # fmt: skip


def train(
    *, probe: bool, roll_at: int = 40, steps: int = 70, loader: Any = None, **kw: Any
) -> tuple[SpikeGuard, nn.Module, torch.optim.Optimizer, list[int]]:
    model = make_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    forensics = ForensicsConfig(enabled=probe, on_state="none")
    guard = SpikeGuard(model, opt, config=MonitorConfig(forensics=forensics), snapshot_every=5,
                       keep_snapshots=12, probe_loss=sample_loss, **kw)  # fmt: skip
    torch.manual_seed(1)
    random.seed(1)
    np.random.seed(1)
    if loader is None:
        loader = DataLoader(Rows(), batch_size=8, shuffle=True,
                            generator=torch.Generator().manual_seed(5))  # fmt: skip
    seen: list[int] = []
    for x, y, idx in guard.batches(loader):
        seen.extend(int(i) for i in idx)
        loss = (model(x).squeeze(-1) - y).pow(2).mean()
        loss.backward()
        guard.step(loss=loss)
        opt.zero_grad(set_to_none=True)
        if guard.step_count == roll_at and not guard.stats["rollbacks"]:
            guard.engine.apply(rollback(guard, onset=roll_at - 8))
        if guard.step_count >= steps:
            break
    return guard, model, opt, seen


def _rng() -> tuple[Any, ...]:
    keys = tuple(np.random.get_state(legacy=True))[1]
    return (torch.get_rng_state(), random.getstate(), np.array(keys).copy())


def test_the_probe_changes_nothing_a_run_without_it_would_not() -> None:
    with_probe = train(probe=True)
    rng_with = _rng()
    without = train(probe=False)
    rng_without = _rng()
    guard, model, opt, seen = with_probe
    assert guard.stats["rollbacks"] == 1 and guard.stats["probe_forward_passes"] > 0
    assert guard.stats["last_verdict"]["cause"] in ("data", "state", "unknown")
    assert without[0].stats["probe_forward_passes"] == 0
    assert seen == without[3]  # the same samples in the same order
    for a, b in zip(model.state_dict().values(), without[1].state_dict().values(), strict=True):
        assert torch.equal(a, b)  # weights and BatchNorm buffers, bit for bit
    for a, b in zip(opt.state.values(), without[2].state.values(), strict=True):
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(rng_with[0], rng_without[0]) and rng_with[1] == rng_without[1]
    assert (rng_with[2] == rng_without[2]).all()
    assert all(m.training for m in model.modules())


def test_corrupted_samples_are_named_by_dataset_index() -> None:
    bad = frozenset(range(260, 300, 3))  # inside the batches trained from the onset on
    loader = DataLoader(Rows(bad=bad), batch_size=8, shuffle=False)
    guard, *_ = train(probe=True, loader=loader, roll_at=40)
    verdict = guard.stats["last_verdict"]
    assert verdict["cause"] == "data", verdict["why"]
    probed = {i for i in bad if i // 8 in set(verdict["suspect_positions"])}
    named = {s["index"] for s in verdict["samples"]}
    assert probed and named == probed


def test_an_iterable_loader_names_positions_without_indices() -> None:
    bad = frozenset(range(260, 300, 3))
    data = Rows(bad=bad)

    def stream() -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        for start in range(0, len(data), 8):
            rows = [data[i] for i in range(start, start + 8)]
            yield (torch.stack([r[0] for r in rows]), torch.stack([r[1] for r in rows]),
                   torch.tensor([r[2] for r in rows]))  # fmt: skip

    guard, *_ = train(probe=True, loader=stream(), roll_at=40)
    verdict = guard.stats["last_verdict"]
    assert verdict["cause"] == "data"
    assert verdict["samples"] and all(s["index"] is None for s in verdict["samples"])
    assert {s["position"] for s in verdict["samples"]} <= {i // 8 for i in bad}


def test_a_cache_too_small_to_reach_past_the_onset_says_so() -> None:
    guard, *_ = train(probe=True, probe_cache_batches=4)
    verdict = guard.stats["last_verdict"]
    assert verdict["cause"] == "unknown"
    assert "raise probe_cache_batches" in verdict["why"]
    assert guard.stats["probe_cache_batches"] <= 4


def test_a_probe_loss_that_raises_fails_open() -> None:
    def broken(model: nn.Module, batch: Any) -> torch.Tensor:
        raise KeyError("labels")

    guard, model, _ = _broken_run(broken)
    verdict = guard.stats["last_verdict"]
    assert verdict["cause"] == "unknown" and "KeyError" in verdict["why"]
    # Rolled back at 40 to 20, batches [20, 45) skipped, then to the end of the data.
    assert guard.stats["probe_failures"] == 1 and guard.step_count == 20 + (80 - 45)
    assert all(m.training for m in model.modules())


def _broken_run(loss_fn: Any) -> Any:
    model = make_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    guard = SpikeGuard(model, opt, snapshot_every=5, keep_snapshots=12, probe_loss=loss_fn)
    loader = DataLoader(Rows(), batch_size=8)
    for x, y, _ in guard.batches(loader):
        loss = (model(x).squeeze(-1) - y).pow(2).mean()
        loss.backward()
        guard.step(loss=loss)
        opt.zero_grad(set_to_none=True)
        if guard.step_count == 40 and not guard.stats["rollbacks"]:
            guard.engine.apply(rollback(guard, onset=32))
        if guard.step_count >= 70:
            break
    return guard, model, opt


def test_without_probe_loss_nothing_is_kept() -> None:
    model = make_model()
    guard = SpikeGuard(model, torch.optim.SGD(model.parameters(), lr=0.1))
    assert guard.engine.forensics is None and guard.stats["last_verdict"] is None
    with pytest.raises(Exception, match="probe_loss"):
        SpikeGuard(model, torch.optim.SGD(model.parameters(), lr=0.1), probe_loss=3)  # type: ignore[arg-type]
    with pytest.raises(Exception, match="probe_cache_batches=0"):
        SpikeGuard(model, torch.optim.SGD(model.parameters(), lr=0.1), probe_cache_batches=0)


def test_state_verdict_under_on_state_halt_halts_after_restoring() -> None:
    model = make_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    config = MonitorConfig(policy=PolicyConfig(margin=10),
                           forensics=ForensicsConfig(on_state="halt"))  # fmt: skip
    guard = SpikeGuard(model, opt, config=config, snapshot_every=5, keep_snapshots=12,
                       probe_loss=sample_loss)  # fmt: skip
    for x, y, _ in guard.batches(DataLoader(Rows(), batch_size=8)):
        loss = (model(x).squeeze(-1) - y).pow(2).mean()
        loss.backward()
        guard.step(loss=loss)
        opt.zero_grad(set_to_none=True)
        if guard.step_count == 40:
            guard.engine.apply(rollback(guard, onset=32))
    assert guard.stats["last_verdict"]["cause"] == "state"
    assert guard.halted and "state-caused" in guard.stats["halt_reason"]
    assert guard.step_count == 20  # restored (a healthy state to restart from), then halted
