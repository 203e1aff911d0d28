"""FSDP2 (``fully_shard``) on two gloo ranks: the ring snapshots each rank's local shards;
rollbacks, lockstep and DCP checkpoints (resumed on 2 ranks and in 1 process) work.

On the landed main, building the guard on such a model crashed with torch's
``aten.copy_.default got mixed torch.Tensor and DTensor``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

from spikewatch.policy import PolicyConfig
from spikewatch.settings import MonitorConfig
from spikewatch_hooks.guard import SpikeGuard
from spikewatch_hooks.state.snapshots.plan import SnapshotError, local

STEPS = 200
MORE = 10  # steps trained after the checkpoint, by the saving run and by the resumed ones
POISON = range(130, 160)  # global batch positions; rank 1's shard is bad

Batch = tuple[int, torch.Tensor, torch.Tensor]


def _net(seed: int) -> torch.nn.Sequential:
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(8, 32), torch.nn.Tanh(), torch.nn.Linear(32, 31), torch.nn.Tanh(),
        torch.nn.Linear(31, 1),
    )  # fmt: skip


def _sharded(seed: int) -> torch.nn.Module:
    net = _net(seed)
    for layer in net:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer)
    fully_shard(net)
    return net


def _loader(rank: int) -> Iterator[Batch]:
    for position in range(10_000):
        g = torch.Generator().manual_seed(1000 * position + rank)
        x = torch.randn(32, 8, generator=g)
        y = x.sum(dim=1, keepdim=True)
        if rank == 1 and position in POISON:
            y = -20.0 * y
        yield position, x, y


def _guard(model: torch.nn.Module) -> SpikeGuard:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=50, gamma=0.5)
    config = MonitorConfig(policy=PolicyConfig(margin=10, skip_ahead=30))
    return SpikeGuard(
        model=model, optimizer=opt, scheduler=sched, config=config, snapshot_every=10,
        keep_snapshots=4,
    )  # fmt: skip


def _train(guard: SpikeGuard, batches: Iterator[Batch], until: int) -> dict[str, Any]:
    """Train until ``until`` steps; the positions trained on, and whether every
    rollback restored the snapshot's shards exactly."""
    model, opt = guard.engine.model, guard.engine.optimizer
    positions, exact = [], []
    while guard.step_count < until:
        position, x, y = next(batches)
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()  # type: ignore[no-untyped-call]
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)  # a DTensor
        decision = guard.step(loss=loss, grad_norm=norm)
        opt.zero_grad(set_to_none=True)
        positions.append(position)
        if decision is not None and decision.action == "rollback":
            exact.append(_matches_snapshot(guard))
    return {"positions": positions, "exact": exact}


def _matches_snapshot(guard: SpikeGuard) -> bool:
    ring = guard.engine.ring
    snap = ring.newest_at_or_before(guard.step_count)
    assert snap is not None
    live = ring.live.tensors()
    return bool(snap.layout.entries) and all(
        torch.equal(local(live[e.key]), snap.host(e.key)) for e in snap.layout.entries
    )


def _full(model: torch.nn.Module) -> torch.Tensor:
    """Every parameter, whole (all-gathered from the shards under FSDP2)."""
    parts = [p.full_tensor() if isinstance(p, DTensor) else p.detach() for p in model.parameters()]
    return torch.cat([p.reshape(-1) for p in parts])


def _init(rank: int, store: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)


def _save_worker(rank: int, out: str) -> None:
    _init(rank, f"{out}/store-save")
    model = _sharded(0)
    guard = _guard(model)
    batches = guard.batches(_loader(rank))
    trained = _train(guard, batches, STEPS)
    guard.save_checkpoint(f"{out}/ckpt")
    saved = _full(model)
    more = _train(guard, batches, STEPS + MORE)
    stats = guard.stats
    try:
        SpikeGuard(model=model, optimizer=guard.engine.optimizer, snapshot_split=True)
        refused = ""
    except SnapshotError as exc:
        refused = str(exc)
    result = {
        "exact": trained["exact"], "rollbacks": stats["rollbacks"],
        "ledger": stats["skip_ledger"], "snapshot_bytes": stats["snapshot_bytes"],
        "slots": len(stats["snapshots"]), "saved": saved, "positions": more["positions"],
        "continued": _full(model), "refused": refused,
        "local_bytes": sum(local(p).numel() * 4 for p in model.parameters()),
    }  # fmt: skip
    torch.save(result, f"{out}/save-{rank}.pt")
    dist.barrier()
    os._exit(0)  # gloo's threads sometimes abort an interpreter teardown


def _resume_worker(rank: int, out: str) -> None:
    _init(rank, f"{out}/store-resume")
    model = _sharded(1)  # other weights: the checkpoint must overwrite them
    guard = _guard(model)
    guard.resume(f"{out}/ckpt")
    loaded, step, ledger = _full(model), guard.step_count, guard.ledger.ranges()
    more = _train(guard, guard.batches(_loader(rank)), STEPS + MORE)
    result = {"loaded": loaded, "step": step, "ledger": ledger, "positions": more["positions"]}
    torch.save({**result, "continued": _full(model)}, f"{out}/resume-{rank}.pt")
    dist.barrier()
    os._exit(0)


def _spawn(worker: Any, out: Path) -> None:
    mp.spawn(worker, args=(str(out),), nprocs=2, join=True)  # type: ignore[attr-defined,no-untyped-call]


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("fsdp")
    _spawn(_save_worker, out)
    return out


def _result(path: Path) -> dict[str, Any]:
    loaded: dict[str, Any] = torch.load(path, weights_only=False)
    return loaded


def test_a_sharded_model_rolls_back_to_its_snapshot_exactly(saved: Path) -> None:
    ranks = [_result(saved / f"save-{r}.pt") for r in (0, 1)]
    for result in ranks:
        assert result["rollbacks"] >= 1
        assert result["exact"] and all(result["exact"])
        start, stop = result["ledger"][0]
        assert start <= POISON.start and stop >= POISON.stop
        # Each rank holds its own shards: weights + two AdamW moments per slot (and
        # the step counters and scheduler-free extras, a few bytes).
        per_slot = 3 * result["local_bytes"]
        assert per_slot <= result["snapshot_bytes"] / result["slots"] <= per_slot + 64
        assert "FSDP2" in result["refused"] and "snapshot_split=None" in result["refused"]
    assert ranks[0]["ledger"] == ranks[1]["ledger"]
    assert torch.equal(ranks[0]["saved"], ranks[1]["saved"])  # the same whole model


def test_two_ranks_resume_a_sharded_checkpoint_and_honour_the_ledger(saved: Path) -> None:
    _spawn(_resume_worker, saved)
    for rank in (0, 1):
        before, after = _result(saved / f"save-{rank}.pt"), _result(saved / f"resume-{rank}.pt")
        assert after["step"] == STEPS
        assert after["ledger"] == before["ledger"]
        assert torch.equal(after["loaded"], before["saved"])
        assert after["positions"] == before["positions"]  # the same batches, ledger skipped
        assert torch.equal(after["continued"], before["continued"])


def test_one_process_resumes_a_sharded_checkpoint_and_honours_the_ledger(saved: Path) -> None:
    before = _result(saved / "save-0.pt")
    guard = _guard(_net(2))  # no process group, no sharding
    guard.resume(saved / "ckpt")
    assert guard.step_count == STEPS
    assert torch.equal(_full(guard.engine.model), before["saved"])
    assert guard.ledger.ranges() == before["ledger"]
    trained = _train(guard, guard.batches(_loader(0)), STEPS + MORE)
    assert trained["positions"] == before["positions"]
    assert not {p for p in trained["positions"] for a, b in before["ledger"] if a <= p < b}
