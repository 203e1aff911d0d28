"""fp16 with a GradScaler: the scaler's start-up back-off is no incident, a real NaN
still is, and the scaler's state is part of every snapshot (CPU autocast fp16, which
really overflows: with ``init_scale=2**30`` the first ~15 steps' gradients are inf)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch

from spikewatch.monitor import Monitor
from spikewatch.policy import PolicyConfig
from spikewatch.settings import MonitorConfig
from spikewatch_hooks.guard import SpikeGuard


def _setup(init_scale: float = 2.0**30) -> tuple[torch.nn.Module, Any, Any]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    return model, opt, torch.amp.GradScaler("cpu", init_scale=init_scale)


def _data(n: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randn(16, 8, generator=g) for _ in range(n)]


def _train(guard: SpikeGuard, model: torch.nn.Module, opt: Any, scaler: Any, n: int, *,
           poison: Any = None, grad_poison: Any = None) -> list[Any]:  # fmt: skip
    """The documented loop: scale, backward, unscale_, clip, guard.step."""
    decisions = []
    for x in guard.batches(_data(n)):
        with torch.autocast("cpu", dtype=torch.float16):
            loss = (model(x) - x[:, :1]).pow(2).mean()
        if poison is not None:
            loss = loss * poison(guard.engine.position)
        # grad_poison: gradients that overflow fp16 with a normal, finite loss reported.
        factor = 1.0 if grad_poison is None else grad_poison(guard.engine.position)
        scaler.scale(loss * factor).backward()
        scaler.unscale_(opt)
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        decision = guard.step(loss=loss, grad_norm=grad_norm)
        opt.zero_grad(set_to_none=True)
        if decision is not None:
            decisions.append(decision)
    return decisions


def test_start_up_back_off_is_counted_not_an_incident_and_a_real_nan_is_skipped() -> None:
    model, opt, scaler = _setup()
    guard = SpikeGuard(model, opt, scaler=scaler, snapshot_every=20)
    decisions = _train(guard, model, opt, scaler, 200,
                       poison=lambda pos: math.nan if pos == 150 else 1.0)  # fmt: skip
    assert guard.stats["rollbacks"] == 0 and not guard.halted
    assert guard.stats["skip_ledger"] == []
    # 2**30 down to fp16's range: one halving per overflowing step, then it trains.
    assert 10 <= guard.stats["scaler_backoffs"] <= 25
    assert scaler.get_scale() <= 2.0**16
    assert [(d.step, d.action) for d in decisions] == [(150, "skip_step")]
    assert guard.stats["skipped_steps"] == 1
    monitor: Monitor = getattr(guard.transport, "monitor")  # noqa: B009
    kinds = [(i.kind, i.onset_step) for i in monitor.incidents if i.action != "watch"]
    # The NaN alone (in the loss and so in the grad norm): no back-off became an incident.
    assert set(kinds) == {("nonfinite", 150)}
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert guard.step_count == 200


def test_a_rollback_restores_the_scalers_state() -> None:
    model, opt, scaler = _setup(init_scale=2.0**14)
    config = MonitorConfig(policy=PolicyConfig(margin=10, skip_ahead=20))
    guard = SpikeGuard(model, opt, scaler=scaler, config=config, snapshot_every=10)
    at_snapshot: dict[int, dict[str, Any]] = {}
    restored = []
    data = _data(260)
    for x in guard.batches(data):
        with torch.autocast("cpu", dtype=torch.float16):
            loss = (model(x) - x[:, :1]).pow(2).mean()
        loss = loss * (40.0 if 150 <= guard.engine.position < 180 else 1.0)
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        if guard.engine.position == 160:
            scaler.update(new_scale=2.0)  # a scale that must not survive the rollback
            scaler.unscale_(opt)
        decision = guard.step(loss=loss, grad_norm=grad_norm)
        opt.zero_grad(set_to_none=True)
        if decision is not None and decision.action == "rollback":
            restored.append(scaler.state_dict() == at_snapshot[guard.step_count])
        elif guard.step_count % 10 == 0:
            at_snapshot[guard.step_count] = scaler.state_dict()
    assert guard.stats["rollbacks"] == 1
    assert restored == [True]
    assert scaler.get_scale() > 2.0


def test_a_collapsed_scale_becomes_an_incident() -> None:
    model, opt, scaler = _setup(init_scale=2.0**3)
    guard = SpikeGuard(model, opt, scaler=scaler, snapshot_every=20)
    # From step 100 the unscaled gradients overflow fp16 themselves (the loss stays
    # finite): the scaler halves the scale every step until it is below 1.0.
    _train(guard, model, opt, scaler, 140, grad_poison=lambda pos: 1e6 if pos >= 100 else 1.0)
    assert guard.engine.updates.collapsed
    assert scaler.get_scale() < 1.0
    assert guard.stats["incidents"] >= 1
    assert guard.stats["skipped_steps"] + guard.stats["rollbacks"] + guard.stats["halted"] >= 1


@pytest.mark.parametrize("folder", [False, True], ids=["file", "dcp-folder"])
def test_the_scalers_state_is_in_checkpoints(tmp_path: Path, folder: bool) -> None:
    model, opt, scaler = _setup()
    guard = SpikeGuard(model, opt, scaler=scaler, snapshot_every=20)
    _train(guard, model, opt, scaler, 30)  # the start-up back-off moved the scale
    saved = scaler.state_dict()
    assert saved["scale"] < 2.0**30
    path = tmp_path / "ckpt"
    if folder:
        path.mkdir()
    else:
        path = path.with_suffix(".pt")
    guard.save_checkpoint(path)
    model2, opt2, scaler2 = _setup()
    SpikeGuard(model2, opt2, scaler=scaler2).resume(path)
    assert scaler2.state_dict() == saved
