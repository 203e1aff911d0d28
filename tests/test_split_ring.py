"""DDP on two gloo ranks: the snapshot ring split across ranks (each keeps 1/world_size)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

from spikewatch.policy import PolicyConfig
from spikewatch.settings import MonitorConfig
from spikewatch_hooks.guard import SpikeGuard
from spikewatch_hooks.state.snapshots.plan import SnapshotError
from spikewatch_hooks.state.snapshots.ring import SnapshotRing

STEPS = 240
POISON = range(150, 180)  # global batch positions; rank 1's shard is bad


def _shard(position: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * position + rank)
    x = torch.randn(32, 8, generator=g)
    y = x.sum(dim=1, keepdim=True)
    if rank == 1 and position in POISON:
        y = -20.0 * y
    return x, y


def _ddp() -> tuple[DistributedDataParallel, torch.optim.Optimizer]:
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(8, 33), torch.nn.Tanh(), torch.nn.Linear(33, 1))
    model = DistributedDataParallel(net)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2)


def _state(model: torch.nn.Module, opt: torch.optim.Optimizer) -> torch.Tensor:
    """Parameters and every optimizer state tensor, flattened (float64 holds them exactly)."""
    parts = [p.detach().reshape(-1).double() for p in model.parameters()]
    for p in model.parameters():
        parts += [v.reshape(-1).double() for v in opt.state[p].values()]
    return torch.cat(parts)


def _same_on_every_rank(flat: torch.Tensor) -> bool:
    gathered = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, flat)
    return all(torch.equal(gathered[0], g) for g in gathered[1:])


def _train(model: torch.nn.Module, opt: torch.optim.Optimizer, positions: range, rank: int) -> None:
    for position in positions:
        x, y = _shard(position, rank)
        torch.nn.functional.mse_loss(model(x), y).backward()  # type: ignore[no-untyped-call]
        opt.step()
        opt.zero_grad(set_to_none=True)


def _ring_check(rank: int) -> dict[str, Any]:
    """A split ring and a full one on the same DDP model: both restore exactly."""
    model, opt = _ddp()
    split = SnapshotRing(model, opt, keep=2)  # DDP, 2 ranks: split by default
    full = SnapshotRing(model, opt, keep=2, split=False)
    _train(model, opt, range(3), rank)
    a, b = split.take(3, 3), full.take(3, 3)
    saved = _state(model, opt)
    _train(model, opt, range(3, 8), rank)
    split.restore(a)
    from_split = _state(model, opt)
    _train(model, opt, range(3, 8), rank)
    full.restore(b)
    return {
        "split": split.split,
        "full": full.split,
        "split_exact": bool(torch.equal(from_split, saved)),
        "full_exact": bool(torch.equal(_state(model, opt), saved)),
        "same": _same_on_every_rank(from_split),
        "split_bytes": a.nbytes,
        "full_bytes": b.nbytes,
    }


def _guarded(rank: int, split: bool | None) -> dict[str, Any]:
    model, opt = _ddp()
    config = MonitorConfig(policy=PolicyConfig(margin=10, skip_ahead=30))
    guard = SpikeGuard(
        model=model, optimizer=opt, config=config, snapshot_every=10, keep_snapshots=4,
        snapshot_split=split,
    )  # fmt: skip
    batches: Iterator[tuple[torch.Tensor, torch.Tensor]] = (_shard(p, rank) for p in range(10_000))
    for x, y in guard.batches(batches):
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()  # type: ignore[no-untyped-call]
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        guard.step(loss=loss, grad_norm=grad_norm)
        opt.zero_grad(set_to_none=True)
        if guard.step_count >= STEPS:
            break
    state = _state(model, opt)
    stats = guard.stats
    per_slot = sum(4 * p.numel() for p in model.parameters()) * 3  # weights + 2 AdamW moments
    return {
        "rollbacks": stats["rollbacks"],
        "slots": len(stats["snapshots"]),
        "snapshot_bytes": stats["snapshot_bytes"],
        "per_slot": per_slot,
        "same": _same_on_every_rank(state),
        "state": state,
    }


def _mismatch(rank: int) -> str:
    """Not replicated (a different model per rank): split=True is refused on every rank."""
    net = torch.nn.Linear(4, 2 + rank)
    try:
        SnapshotRing(net, torch.optim.SGD(net.parameters(), lr=0.1), split=True)
    except SnapshotError as exc:
        return str(exc)
    return ""


def _worker(rank: int, out: str) -> None:
    torch.set_num_threads(1)
    store = f"file://{out}/store"
    dist.init_process_group("gloo", init_method=store, rank=rank, world_size=2)
    result = {
        "ring": _ring_check(rank),
        "split": _guarded(rank, None),
        "full": _guarded(rank, False),
        "mismatch": _mismatch(rank),
    }
    torch.save(result, f"{out}/rank{rank}.pt")
    dist.barrier()
    os._exit(0)  # gloo's threads sometimes abort an interpreter teardown


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    out = tmp_path_factory.mktemp("split")
    mp.spawn(_worker, args=(str(out),), nprocs=2, join=True)  # type: ignore[attr-defined,no-untyped-call]
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in (0, 1)]


def test_the_split_ring_restores_parameters_and_optimizer_state_exactly(
    ranks: list[dict[str, Any]],
) -> None:
    for result in ranks:
        ring = result["ring"]
        assert ring["split"] is True and ring["full"] is False  # the default splits DDP
        assert ring["split_exact"] and ring["full_exact"] and ring["same"]
        # 1/world_size of the flattened state, plus each rank's copy of the step counters
        # and at most one element of padding per dtype.
        assert ring["split_bytes"] <= ring["full_bytes"] / 2 + 4 * 4 + 4


def test_a_guarded_ddp_run_holds_half_the_bytes_and_rolls_back_identically(
    ranks: list[dict[str, Any]],
) -> None:
    for result in ranks:
        split, full = result["split"], result["full"]
        assert split["rollbacks"] >= 1 and split["rollbacks"] == full["rollbacks"]
        assert split["same"] and full["same"]  # bit-identical on both ranks
        assert torch.equal(split["state"], full["state"])  # the same run as full copies
        assert split["slots"] == full["slots"] == 4
        assert split["snapshot_bytes"] <= 0.6 * split["per_slot"] * split["slots"]
        assert full["snapshot_bytes"] >= split["per_slot"] * full["slots"]
    assert ranks[0]["split"]["snapshot_bytes"] == ranks[1]["split"]["snapshot_bytes"]


def test_split_state_that_is_not_replicated_is_refused_on_every_rank(
    ranks: list[dict[str, Any]],
) -> None:
    for result in ranks:
        assert "snapshot layouts differ" in result["mismatch"]
        assert "snapshot_split=False" in result["mismatch"]
