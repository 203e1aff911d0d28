"""Deep rollback from a DCP checkpoint folder under torch.distributed: 2 gloo ranks
(spawn, file store), DDP, two optimizers and two schedulers."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

from spikewatch.records import Decision
from spikewatch_hooks.guard import SpikeGuard

SAVED_AT, TRAINED_TO, TARGET = 30, 50, 35


def _state(model: torch.nn.Module, opts: list[torch.optim.Optimizer], scheds: list[Any]) -> Any:
    tensors = [p.detach().reshape(-1) for p in model.parameters()]
    for opt in opts:
        for state in opt.state.values():
            tensors += [v.detach().reshape(-1).float() for v in state.values()]
    return torch.cat(tensors).clone(), [s.state_dict()["last_epoch"] for s in scheds]


def _worker(rank: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{out}/store", rank=rank, world_size=2)
    torch.manual_seed(0)
    inner = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    model = DistributedDataParallel(inner)
    opts: list[torch.optim.Optimizer] = [
        torch.optim.AdamW(inner[0].parameters(), lr=1e-2),
        torch.optim.SGD(inner[2].parameters(), lr=1e-2, momentum=0.9),
    ]
    scheds = [torch.optim.lr_scheduler.StepLR(o, step_size=7, gamma=0.5) for o in opts]
    guard = SpikeGuard(model, opts, scheds, snapshot_every=10, keep_snapshots=1,
                       checkpoint_dir=out, checkpoint_every=SAVED_AT)  # fmt: skip
    saved = None
    for position in range(TRAINED_TO):
        g = torch.Generator().manual_seed(1000 * position + rank)
        x = torch.randn(16, 8, generator=g)
        guard.engine.position = position
        loss: Any = torch.nn.functional.mse_loss(model(x), x.sum(dim=1, keepdim=True))
        loss.backward()
        guard.step(loss=loss)
        for opt in opts:
            opt.zero_grad(set_to_none=True)
        if guard.step_count == SAVED_AT:
            saved = _state(inner, opts, scheds)
    guard.ledger.add(900, 910, reason="newer than the checkpoint")
    guard.engine.rollback(Decision(run="run", step=TRAINED_TO, action="rollback",
                                   reason="test", rollback_before_step=TARGET))  # fmt: skip
    restored = _state(inner, opts, scheds)
    torch.save({"saved": saved, "restored": restored, "step": guard.step_count,
                "ledger": guard.ledger.ranges()}, f"{out}/rank{rank}.pt")  # fmt: skip
    dist.barrier()
    os._exit(0)  # no interpreter teardown around gloo's threads (see test_dist_checkpoint)


def test_two_ranks_restore_the_dcp_checkpoint_when_the_ring_does_not_reach(
    tmp_path: Path,
) -> None:
    mp.spawn(_worker, args=(str(tmp_path),), nprocs=2, join=True)  # type: ignore[attr-defined,no-untyped-call]
    assert (tmp_path / "spikewatch-latest" / "guard.json").exists()
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for result in results:
        assert result["step"] == SAVED_AT
        assert torch.equal(result["restored"][0], result["saved"][0])
        assert result["restored"][1] == result["saved"][1] == [SAVED_AT, SAVED_AT]
        assert result["ledger"] == [(SAVED_AT, TRAINED_TO), (900, 910)]
    assert torch.equal(results[0]["restored"][0], results[1]["restored"][0])
