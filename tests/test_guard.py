"""SpikeGuard in hand-written loops: real training of a tiny model on CPU."""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from spikewatch.errors import ConfigError
from spikewatch.monitor import Monitor
from spikewatch.policy import PolicyConfig
from spikewatch.records import Decision, StepRecord
from spikewatch.settings import MonitorConfig
from spikewatch.transport import EmbeddedTransport
from spikewatch_hooks.demo.corpus import CharCorpus
from spikewatch_hooks.demo.scenario import DemoSettings, load_corpus, train
from spikewatch_hooks.guard import SpikeGuard
from spikewatch_hooks.state.checkpoint import CheckpointError

SMALL = dataclasses.replace(
    DemoSettings.for_steps(400), batch_size=16, context=32, warmup=20, poison_batches=60
)


@pytest.fixture(scope="module")
def corpus() -> Iterator[CharCorpus]:
    # One thread: two OpenMP threads on a busy 2-core host run many times slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield load_corpus()
    torch.set_num_threads(threads)


def test_poisoned_run_recovers_only_with_the_guard(corpus: CharCorpus) -> None:
    clean = train("clean", SMALL, corpus)
    unguarded = train("unguarded", SMALL, corpus)
    guarded = train("guarded", SMALL, corpus)
    assert unguarded.final_loss >= 1.20 * clean.final_loss
    assert abs(guarded.final_loss - clean.final_loss) <= 0.05 * clean.final_loss
    assert guarded.stats["rollbacks"] >= 1
    assert guarded.onset_step == SMALL.poison_start
    [(start, stop)] = guarded.stats["skip_ledger"]
    assert start <= SMALL.poison_start
    assert stop >= SMALL.poison_start + SMALL.poison_batches


def _linear_setup(lr: float = 0.05) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 1)
    return model, torch.optim.AdamW(model.parameters(), lr=lr)


def _data(n: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randn(16, 8, generator=g) for _ in range(n)]


def _loop(
    guard: SpikeGuard,
    model: torch.nn.Module,
    data: list[torch.Tensor],
    poison: dict[int, float] | None = None,
) -> list[Decision]:
    out = []
    for x in guard.batches(data):
        loss = (model(x) - x.sum(dim=1, keepdim=True)).pow(2).mean()
        if poison and guard.engine.position in poison:
            loss = loss * poison[guard.engine.position]
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        decision = guard.step(loss=loss, grad_norm=grad_norm)
        guard.engine.optimizer.zero_grad(set_to_none=True)
        if decision is not None:
            out.append(decision)
    return out


def test_healthy_run_sees_no_rollback(corpus: CharCorpus) -> None:
    model, opt = _linear_setup()
    guard = SpikeGuard(model=model, optimizer=opt, snapshot_every=20)
    _loop(guard, model, _data(300))
    assert guard.stats["rollbacks"] == 0
    assert guard.stats["skipped_steps"] == 0
    assert guard.step_count == 300


def test_nan_loss_skips_the_update_and_keeps_weights_finite() -> None:
    model, opt = _linear_setup()
    guard = SpikeGuard(model=model, optimizer=opt, snapshot_every=20)
    decisions = _loop(guard, model, _data(120), poison={80: math.nan})
    assert [(d.step, d.action) for d in decisions] == [(80, "skip_step")]
    assert guard.stats["skipped_steps"] == 1
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_rollback_restores_the_snapshot_exactly_and_skips_its_batches() -> None:
    model, opt = _linear_setup()
    config = MonitorConfig(policy=PolicyConfig(margin=10, skip_ahead=5))
    guard = SpikeGuard(model=model, optimizer=opt, config=config, snapshot_every=10)
    restored_exactly = []
    for x in guard.batches(_data(260)):
        loss = (model(x) - x.sum(dim=1, keepdim=True)).pow(2).mean()
        if guard.engine.position >= 150:
            loss = loss * 50.0  # from here on the loss jumps and stays up
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        decision = guard.step(loss=loss, grad_norm=grad_norm)
        opt.zero_grad(set_to_none=True)
        if decision is not None and decision.action == "rollback":
            snap = guard.engine.ring.newest_at_or_before(guard.step_count)
            assert snap is not None and snap.step == guard.step_count
            live = model.state_dict()
            restored_exactly.append(all(torch.equal(live[k], v) for k, v in snap.model.items()))
            restored_exactly.append(
                torch.equal(
                    opt.state[next(model.parameters())]["exp_avg"],
                    snap.host(("optim", 0, 0, "exp_avg")),
                )
            )
            if len(restored_exactly) == 2:
                assert decision.rollback_before_step == 140
                assert guard.step_count == 140
                assert guard.ledger.ranges()[0][0] == 140
    assert restored_exactly and all(restored_exactly)
    assert guard.stats["rollbacks"] >= 1


def test_escalation_cuts_the_learning_rate_of_optimizer_and_scheduler() -> None:
    model, opt = _linear_setup(lr=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    guard = SpikeGuard(model=model, optimizer=opt, scheduler=sched, snapshot_every=10)
    _loop(guard, model, _data(60))
    decision = Decision(
        run="run",
        step=guard.step_count,
        action="rollback",
        reason="test",
        rollback_before_step=40,
        lr_factor=0.5,
        escalation=1,
    )
    guard.engine.apply(decision)
    assert guard.step_count == 40
    assert opt.param_groups[0]["lr"] == pytest.approx(0.005)
    assert sched.base_lrs == [pytest.approx(0.005)]


def test_checkpoint_resume_honours_the_ledger(tmp_path: Path) -> None:
    model, opt = _linear_setup()
    guard = SpikeGuard(model=model, optimizer=opt, snapshot_every=10)
    data = _data(100)
    _loop(guard, model, data[:50])
    guard.engine.ledger.add(60, 70, reason="test")
    guard.save_checkpoint(tmp_path / "ckpt.pt")
    model2, opt2 = _linear_setup()
    resumed = SpikeGuard(model=model2, optimizer=opt2, snapshot_every=10)
    resumed.resume(tmp_path / "ckpt.pt")
    assert resumed.step_count == 50
    assert all(
        torch.equal(a, b) for a, b in zip(model.parameters(), model2.parameters(), strict=True)
    )
    seen = [resumed.engine.position for _ in resumed.batches(data)]
    assert seen[0] == 50
    assert not set(range(60, 70)) & set(seen)
    assert resumed.stats["skipped_batches"] == 10


def test_corrupt_checkpoint_is_refused(tmp_path: Path) -> None:
    model, opt = _linear_setup()
    guard = SpikeGuard(model=model, optimizer=opt)
    path = tmp_path / "ckpt.pt"
    guard.save_checkpoint(path)
    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="checksum mismatch"):
        guard.resume(path)


def test_budget_spent_halts_and_stops_the_loop(caplog: pytest.LogCaptureFixture) -> None:
    model, opt = _linear_setup()
    config = MonitorConfig(policy=PolicyConfig(max_rollbacks=0))
    guard = SpikeGuard(model=model, optimizer=opt, config=config, snapshot_every=10)
    poison = {p: math.nan for p in range(100, 200)}
    with caplog.at_level(logging.ERROR, logger="spikewatch_hooks"):
        _loop(guard, model, _data(300), poison=poison)
    assert guard.halted
    assert guard.step_count < 110
    assert "rollback budget is spent" in guard.stats["halt_reason"]
    assert "halted run" in caplog.text


class _BrokenMonitor(Monitor):
    def observe(self, record: StepRecord) -> list[Decision]:
        raise RuntimeError("monitor bug")


def test_a_failing_monitor_never_stops_training() -> None:
    model, opt = _linear_setup()
    transport = EmbeddedTransport(_BrokenMonitor())
    guard = SpikeGuard(model=model, optimizer=opt, transport=transport)
    _loop(guard, model, _data(30))
    assert guard.step_count == 30
    assert transport.failures == 30 // 8  # records reach the monitor 8 at a time


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"optimizer": None}, "optimizer='NoneType' is invalid: pass the torch.optim.Optimizer"),
        ({"snapshot_every": 0}, "snapshot_every=0 is invalid: use an integer >= 1"),
        ({"margin": -5}, "margin=-5 is invalid: use an integer >= 0"),
        ({"scheduler": "cosine"}, "scheduler='str' is invalid: pass a torch.optim.lr_scheduler"),
        ({"checkpoint_every": 10}, "checkpoint_dir=None is invalid: set a folder"),
    ],
)
def test_wrong_use_fails_at_construction(kwargs: dict[str, object], message: str) -> None:
    model, opt = _linear_setup()
    args: dict[str, object] = {"model": model, "optimizer": opt, **kwargs}
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        SpikeGuard(**args)  # type: ignore[arg-type]
