"""The snapshot ring's layout in one process: only what can change, several optimizers,
schedulers and extras, the host-memory budget, and refusals with the fix."""

from __future__ import annotations

import logging
from typing import Any

import pytest
import torch
from torch import nn

from spikewatch.errors import ConfigError
from spikewatch_hooks.guard import SpikeGuard
from spikewatch_hooks.state.snapshots.plan import SnapshotError
from spikewatch_hooks.state.snapshots.ring import SnapshotRing


def _nbytes(tensors: Any) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _train(model: nn.Module, opts: list[torch.optim.Optimizer], steps: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(16, 32, generator=g)
        model(x).pow(2).mean().backward()
        for opt in opts:
            opt.step()
            opt.zero_grad(set_to_none=True)


def _frozen_backbone() -> tuple[nn.Module, nn.Linear, nn.Linear, torch.optim.Optimizer]:
    """A frozen backbone (whose first layer is returned) and a trainable head."""
    torch.manual_seed(0)
    first = nn.Linear(32, 256)
    backbone = nn.Sequential(first, nn.Tanh(), nn.Linear(256, 256), nn.Tanh())
    head = nn.Linear(256, 4)
    backbone.requires_grad_(False)
    model = nn.Sequential(backbone, head)
    return model, first, head, torch.optim.AdamW(head.parameters(), lr=1e-2)


def test_a_frozen_backbone_is_not_copied_into_every_slot() -> None:
    model, _, head, opt = _frozen_backbone()
    guard = SpikeGuard(model=model, optimizer=opt, snapshot_every=5, keep_snapshots=3)
    _train(model, [opt], 1, seed=1)
    ring = guard.engine.ring
    snap = ring.take(step=1, data_position=1)
    trainable = _nbytes(head.parameters())
    optimizer_state = _nbytes(t for s in opt.state.values() for t in s.values())
    # exp_avg and exp_avg_sq of the head, plus two 4-byte step counters.
    assert optimizer_state == 2 * trainable + 8
    assert snap.nbytes == trainable + optimizer_state  # within 0 bytes: nothing else
    everything = _nbytes(model.parameters()) + optimizer_state
    assert snap.nbytes < 0.06 * everything  # the backbone dominates the model
    assert guard.stats["snapshot_bytes"] == ring.nbytes


def test_rollback_restores_the_head_and_leaves_the_frozen_backbone_alone() -> None:
    model, first, head, opt = _frozen_backbone()
    ring = SnapshotRing(model, opt, keep=2)
    _train(model, [opt], 3, seed=1)
    snap = ring.take(step=3, data_position=3)
    head_before = [p.detach().clone() for p in head.parameters()]
    state_before = {k: v.clone() for k, v in opt.state[head.weight].items()}
    _train(model, [opt], 4, seed=2)
    with torch.no_grad():
        first.weight.add_(1.0)  # a hand edit of a frozen weight
    edited = first.weight.detach().clone()
    ring.restore(snap)
    assert all(torch.equal(p, q) for p, q in zip(head.parameters(), head_before, strict=True))
    assert all(torch.equal(opt.state[head.weight][k], v) for k, v in state_before.items())
    assert torch.equal(first.weight, edited)  # frozen: not snapshotted by default


def test_snapshot_frozen_restores_hand_edited_frozen_weights() -> None:
    model, first, _, opt = _frozen_backbone()
    guard = SpikeGuard(model=model, optimizer=opt, snapshot_frozen=True)
    original = first.weight.detach().clone()
    with torch.no_grad():
        first.weight.mul_(0.0)
    guard.engine.ring.restore(guard.engine.ring.oldest())
    assert torch.equal(first.weight, original)


def test_batchnorm_running_statistics_are_restored() -> None:
    torch.manual_seed(0)
    norm = nn.BatchNorm1d(8)
    model = nn.Sequential(nn.Linear(32, 8), norm, nn.Linear(8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    ring = SnapshotRing(model, opt, keep=2)
    _train(model, [opt], 2, seed=1)
    snap = ring.take(step=2, data_position=2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    _train(model, [opt], 3, seed=2)
    assert norm.running_mean is not None
    assert not torch.equal(norm.running_mean, before["1.running_mean"])
    ring.restore(snap)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


class _Counter:
    """An extra with ``state_dict``/``load_state_dict`` (what a GradScaler offers)."""

    def __init__(self) -> None:
        self.value = 0

    def state_dict(self) -> dict[str, Any]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.value = state["value"]


def test_two_optimizers_schedulers_and_extras_are_restored_exactly() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 16), nn.Tanh(), nn.Linear(16, 1))
    adam = torch.optim.AdamW(model[0].parameters(), lr=1e-2)
    sgd = torch.optim.SGD(model[2].parameters(), lr=0.1, momentum=0.9)
    scheds = [torch.optim.lr_scheduler.StepLR(o, step_size=2, gamma=0.5) for o in (adam, sgd)]
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**30)
    counter = _Counter()
    ring = SnapshotRing(
        model, [adam, sgd], scheds, keep=3, extras={"scaler": scaler, "counter": counter}
    )
    _train(model, [adam, sgd], 3, seed=1)
    for s in scheds:
        s.step()
    counter.value = 3
    snap = ring.take(step=3, data_position=3)
    saved = [
        {p: {k: v.clone() for k, v in s.items()} for p, s in o.state.items()} for o in (adam, sgd)
    ]
    lrs = [[g["lr"] for g in o.param_groups] for o in (adam, sgd)]
    scaler_state = scaler.state_dict()
    _train(model, [adam, sgd], 4, seed=2)
    for s in scheds:
        s.step()
        s.step()
    counter.value = 99
    scaler.scale(torch.ones(()))
    scaler.update(new_scale=8.0)
    assert scaler.state_dict() != scaler_state
    ring.restore(snap)
    for opt, before in zip((adam, sgd), saved, strict=True):
        assert set(opt.state) == set(before)
        for p, state in before.items():
            assert set(opt.state[p]) == set(state)
            assert all(torch.equal(opt.state[p][k], v) for k, v in state.items())
    assert [[g["lr"] for g in o.param_groups] for o in (adam, sgd)] == lrs
    assert [s.last_epoch for s in scheds] == [1, 1]
    assert counter.value == 3
    assert scaler.state_dict() == scaler_state


def test_a_snapshot_before_the_first_step_clears_state_that_appeared_since() -> None:
    torch.manual_seed(0)
    model = nn.Linear(32, 1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ring = SnapshotRing(model, opt, keep=2)
    empty = ring.take(step=0, data_position=0)
    _train(model, [opt], 2, seed=1)
    later = ring.take(step=2, data_position=2)
    assert later.nbytes > empty.nbytes  # the state appeared: the slot grew
    state = {k: v.clone() for k, v in opt.state[model.weight].items()}
    opt.state.clear()  # as if the optimizer were rebuilt: the state must be allocated
    ring.restore(later)
    assert all(torch.equal(opt.state[model.weight][k], v) for k, v in state.items())
    ring.restore(empty)
    assert len(opt.state) == 0


def test_a_budget_too_small_for_one_slot_is_refused_with_the_numbers() -> None:
    model = nn.Linear(100, 10)  # 1,010 parameters: 4,040 bytes, AdamW state twice that
    opt = torch.optim.AdamW(model.parameters())
    with pytest.raises(ConfigError, match=r"snapshot_budget_bytes=5000 is too small") as err:
        SpikeGuard(model=model, optimizer=opt, snapshot_budget_bytes=5000)
    assert "12,120 bytes per slot" in str(err.value)
    assert "raise it to at least 12120" in str(err.value)
    assert isinstance(err.value, SnapshotError)


def test_a_budget_for_fewer_slots_keeps_as_many_as_fit(caplog: pytest.LogCaptureFixture) -> None:
    torch.manual_seed(0)
    model = nn.Linear(32, 10)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    slot = 3 * _nbytes(model.parameters()) + 8  # weights, exp_avg, exp_avg_sq, steps
    with caplog.at_level(logging.WARNING, logger="spikewatch_hooks"):
        guard = SpikeGuard(
            model=model, optimizer=opt, snapshot_every=1, keep_snapshots=4,
            snapshot_budget_bytes=2 * slot + 100,
        )  # fmt: skip
    assert "holds 2 of keep_snapshots=4" in caplog.text
    for step in range(6):
        x = torch.randn(8, 32)
        loss = model(x).pow(2).mean()
        loss.backward()
        guard.step(loss=loss)
        opt.zero_grad(set_to_none=True)
        assert guard.stats["snapshot_bytes"] <= 2 * slot + 100, step
    assert len(guard.stats["snapshots"]) == 2
    assert guard.stats["snapshot_bytes"] == 2 * slot


def test_a_budget_outgrown_by_unexpected_state_keeps_fewer_slots(
    caplog: pytest.LogCaptureFixture,
) -> None:
    model = nn.Linear(32, 10)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)  # estimated: no state
    weights = _nbytes(model.parameters())
    ring = SnapshotRing(model, opt, keep=3, budget_bytes=3 * weights)
    assert ring.keep == 3
    ring.take(0, 0)
    for p in model.parameters():  # state the estimate did not foresee
        opt.state[p]["trace"] = torch.zeros_like(p)
    with caplog.at_level(logging.WARNING, logger="spikewatch_hooks"):
        ring.take(1, 1)
        ring.take(2, 2)
    assert "grew to" in caplog.text
    assert ring.keep == 1 and ring.steps == [2] and ring.nbytes <= 3 * weights


@pytest.mark.parametrize(
    ("option", "value", "fix"),
    [
        ("snapshot_split", "yes", "use None"),
        ("snapshot_budget_bytes", 0, "bytes >= 1"),
        ("snapshot_budget_bytes", 1.5, "bytes >= 1"),
        ("snapshot_frozen", None, "True or False"),
    ],
)
def test_snapshot_options_of_the_wrong_kind_are_refused(option: str, value: Any, fix: str) -> None:
    model = nn.Linear(2, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ConfigError, match=rf"{option}={value!r} is invalid: .*{fix}"):
        SpikeGuard(model=model, optimizer=opt, **{option: value})


def test_a_lazy_module_is_refused_with_the_fix() -> None:
    model = nn.Sequential(nn.LazyLinear(4))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(SnapshotError, match=r"'0.weight' is not initialised .* forward pass"):
        SpikeGuard(model=model, optimizer=opt)


def test_a_sparse_parameter_is_refused_with_the_fix() -> None:
    model = nn.Linear(4, 4)
    model.weight = nn.Parameter(torch.eye(4).to_sparse())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(SnapshotError, match=r"'weight' has layout torch.sparse_coo: .*dense"):
        SpikeGuard(model=model, optimizer=opt)


def test_a_tensor_subclass_is_refused_with_the_fix() -> None:
    class Tagged(torch.Tensor):
        pass

    model = nn.Linear(4, 4)
    model.register_buffer("tag", torch.zeros(2).as_subclass(Tagged))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(SnapshotError, match=r"'tag' is a Tagged, a tensor subclass .* plain"):
        SpikeGuard(model=model, optimizer=opt)


def test_an_extra_without_state_dict_is_refused_with_the_fix() -> None:
    model = nn.Linear(2, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(SnapshotError, match=r"extras\['scaler'\] is a int without state_dict"):
        SnapshotRing(model, opt, extras={"scaler": 3})
