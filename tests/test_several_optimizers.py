"""Several optimizers and schedulers in one guard: stepped, skipped, snapshotted,
restored and checkpointed together (real training of a tiny model on CPU)."""

from __future__ import annotations

import copy
import logging
import math
from pathlib import Path
from typing import Any

import pytest
import torch

from spikewatch.errors import ConfigError
from spikewatch.policy import PolicyConfig
from spikewatch.records import Decision
from spikewatch.settings import MonitorConfig
from spikewatch_hooks.guard import SpikeGuard
from spikewatch_hooks.state.snapshots.ring import SnapshotRing


def _setup() -> tuple[torch.nn.Sequential, list[torch.optim.Optimizer], list[Any]]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))
    first = torch.optim.AdamW(model[0].parameters(), lr=0.02)
    second = torch.optim.SGD(model[2].parameters(), lr=0.05, momentum=0.9)
    schedulers = [
        torch.optim.lr_scheduler.StepLR(first, step_size=7, gamma=0.9),
        torch.optim.lr_scheduler.LambdaLR(second, lambda s: 1.0 / (1 + 0.01 * s)),
    ]
    return model, [first, second], schedulers


def _data(n: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randn(16, 8, generator=g) for _ in range(n)]


def _loss(model: torch.nn.Module, x: torch.Tensor) -> Any:
    return (model(x) - x.sum(dim=1, keepdim=True)).pow(2).mean()


def _state(model: torch.nn.Module, opts: list[torch.optim.Optimizer], scheds: list[Any]) -> Any:
    """Every tensor and number that shapes the next update, deep-copied."""
    return copy.deepcopy(
        {
            "model": model.state_dict(),
            "optimizers": [o.state_dict() for o in opts],
            "schedulers": [s.state_dict() for s in scheds],
        }
    )


def _equal(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


def test_two_optimizers_are_restored_exactly_by_a_rollback() -> None:
    model, opts, scheds = _setup()
    config = MonitorConfig(policy=PolicyConfig(margin=10, skip_ahead=20))
    guard = SpikeGuard(model, optimizer=opts, scheduler=scheds, config=config, snapshot_every=10)
    at_snapshot = {0: _state(model, opts, scheds)}
    checked = []
    for x in guard.batches(_data(260)):
        loss = _loss(model, x) * (50.0 if 150 <= guard.engine.position < 180 else 1.0)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        decision = guard.step(loss=loss, grad_norm=grad_norm)
        for opt in opts:
            opt.zero_grad(set_to_none=True)
        if decision is not None and decision.action == "rollback":
            expected = at_snapshot[guard.step_count]
            checked.append(_equal(_state(model, opts, scheds), expected))
        elif guard.step_count % 10 == 0:
            at_snapshot[guard.step_count] = _state(model, opts, scheds)
    assert guard.stats["rollbacks"] == 1
    assert checked == [True]
    # Both were really trained: the second optimizer's momentum is there.
    assert all(len(o.state) == 2 for o in opts)


def test_a_skipped_step_skips_every_optimizer_and_steps_every_scheduler() -> None:
    model, opts, scheds = _setup()
    guard = SpikeGuard(model, optimizer=opts, scheduler=scheds, snapshot_every=20)
    before = None
    for x in guard.batches(_data(60)):
        loss = _loss(model, x)
        if guard.engine.position == 40:
            loss = loss * math.nan
            before = _state(model, opts, scheds)
        loss.backward()
        guard.step(loss=loss, grad_norm=torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0))
        if before is not None and guard.step_count == 41:
            after = _state(model, opts, scheds)
            assert _equal(after["model"], before["model"])
            assert _equal(after["optimizers"][1]["state"], before["optimizers"][1]["state"])
            assert [s["last_epoch"] for s in after["schedulers"]] == [41, 41]
        for opt in opts:
            opt.zero_grad(set_to_none=True)
    assert guard.stats["skipped_steps"] == 1


def test_an_lr_cut_applies_to_every_optimizer_and_scheduler_and_lr_is_the_firsts() -> None:
    model, opts, scheds = _setup()
    guard = SpikeGuard(model, optimizer=opts, scheduler=scheds, snapshot_every=5)
    for x in guard.batches(_data(10)):
        _loss(model, x).backward()
        guard.step(loss=_loss(model, x).detach())
    lrs = [o.param_groups[0]["lr"] for o in opts]
    cut = Decision(run="run", step=10, action="rollback", reason="test",
                   rollback_before_step=10, lr_factor=0.5)  # fmt: skip
    guard.engine.rollback(cut)
    assert [o.param_groups[0]["lr"] for o in opts] == pytest.approx([lr * 0.5 for lr in lrs])
    assert scheds[0].base_lrs == pytest.approx([0.01]) and scheds[1].base_lrs == [0.025]
    assert guard.engine.updates.lr() == pytest.approx(lrs[0] * 0.5)


@pytest.mark.parametrize("folder", [False, True], ids=["file", "dcp-folder"])
def test_checkpoint_round_trip_holds_every_optimizer(tmp_path: Path, folder: bool) -> None:
    model, opts, scheds = _setup()
    guard = SpikeGuard(model, optimizer=opts, scheduler=scheds, snapshot_every=10)
    for x in guard.batches(_data(25)):
        _loss(model, x).backward()
        guard.step(loss=_loss(model, x).detach())
        for opt in opts:
            opt.zero_grad(set_to_none=True)
    saved = _state(model, opts, scheds)
    path = tmp_path / "ckpt"
    if folder:
        path.mkdir()
    else:
        path = path.with_suffix(".pt")
    guard.save_checkpoint(path)
    model2, opts2, scheds2 = _setup()
    resumed = SpikeGuard(model2, optimizer=opts2, scheduler=scheds2)
    resumed.resume(path)
    assert resumed.step_count == 25
    assert _equal(_state(model2, opts2, scheds2), saved)


def test_a_checkpoint_with_other_optimizers_is_refused_with_the_fix(tmp_path: Path) -> None:
    model, opts, scheds = _setup()
    SpikeGuard(model, optimizer=opts, scheduler=scheds).save_checkpoint(tmp_path / "c.pt")
    model2, opts2, _ = _setup()
    with pytest.raises(Exception, match=r"holds 2 optimizer\(s\), the guard has 1; pass the same"):
        SpikeGuard(model2, optimizer=opts2[0]).resume(tmp_path / "c.pt")


def test_the_ring_takes_a_list_of_optimizers_and_extras() -> None:
    model, opts, scheds = _setup()
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    scaler.scale(torch.ones(()))  # the scale tensor exists from the first scale()
    for x in _data(3):
        _loss(model, x).backward()
        for opt, sched in zip(opts, scheds, strict=True):
            opt.step()
            sched.step()
    ring = SnapshotRing(model, opts, scheds, keep=2, extras={"scaler": scaler})
    snap = ring.take(step=3, data_position=3)
    before = _state(model, opts, scheds)
    for x in _data(2):
        _loss(model, x).backward()
        for opt, sched in zip(opts, scheds, strict=True):
            opt.step()
            sched.step()
    scaler.update(new_scale=8.0)
    assert not _equal(_state(model, opts, scheds), before) and scaler.get_scale() == 8.0
    ring.restore(snap)
    assert _equal(_state(model, opts, scheds), before)
    assert scaler.get_scale() == 1024.0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"optimizer": []}, "optimizer=\\[\\] is invalid: pass the torch.optim.Optimizer"),
        ({"optimizer": ["sgd"]}, "optimizer='str' is invalid"),
        ({"scheduler": [object()]}, "scheduler='object' is invalid: pass a torch.optim.lr_sch"),
        ({"scaler": object()}, "scaler='object' is invalid: pass a torch.amp.GradScaler"),
    ],
)
def test_wrong_lists_fail_at_construction(kwargs: dict[str, Any], message: str) -> None:
    model, opts, _ = _setup()
    with pytest.raises(ConfigError, match=message):
        SpikeGuard(model, **{"optimizer": opts, **kwargs})


def test_a_dcp_folder_with_other_schedulers_is_refused_before_anything_loads(
    tmp_path: Path,
) -> None:
    model, opts, scheds = _setup()
    (tmp_path / "ckpt").mkdir()
    SpikeGuard(model, optimizer=opts, scheduler=scheds).save_checkpoint(tmp_path / "ckpt")
    model2, opts2, scheds2 = _setup()
    first = model2[0]
    assert isinstance(first, torch.nn.Linear)
    torch.nn.init.zeros_(first.weight)
    guard = SpikeGuard(model2, optimizer=opts2, scheduler=scheds2[0])
    with pytest.raises(Exception, match=r"holds 2 scheduler\(s\), the guard has 1; pass the same"):
        guard.resume(tmp_path / "ckpt")
    assert not first.weight.any()  # untouched


def test_a_left_out_optimizer_is_named_at_construction(caplog: pytest.LogCaptureFixture) -> None:
    model, opts, _ = _setup()
    with caplog.at_level(logging.WARNING, logger="spikewatch_hooks"):
        SpikeGuard(model, optimizer=opts[0])
    assert "2 trainable parameter(s) of the model are in no optimizer given" in caplog.text
    assert "2.weight, 2.bias" in caplog.text and "optimizer=[o1, o2]" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="spikewatch_hooks"):
        SpikeGuard(model, optimizer=opts)
    assert "in no optimizer" not in caplog.text
