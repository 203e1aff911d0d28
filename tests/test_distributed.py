"""Two ranks with gloo (torch.multiprocessing.spawn, file store): lockstep rollbacks."""

from __future__ import annotations

import json
import math
import os
import threading
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

from service_process import TOKEN as SERVICE_TOKEN
from service_process import ServiceProcess
from spikewatch.policy import PolicyConfig
from spikewatch.settings import MonitorConfig
from spikewatch_hooks.guard import SpikeGuard

STEPS = 300
POISON = range(200, 230)  # global batch positions; only rank 1's shard is bad
NAN_AT = 100


def _shard(position: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * position + rank)
    x = torch.randn(32, 8, generator=g)
    y = x.sum(dim=1, keepdim=True)
    if rank == 1 and position in POISON:
        y = -20.0 * y  # a corrupted shard on one rank only
    if rank == 1 and position == NAN_AT:
        y = torch.full_like(y, float("nan"))  # a NaN loss on one rank counts for all
    return x, y


def _ddp_mlp(
    rank: int, store: str
) -> tuple[DistributedDataParallel, torch.optim.Optimizer, MonitorConfig]:
    """Join the 2-rank group; a seeded DDP MLP, its AdamW, a policy sized to the run."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    torch.manual_seed(0)
    model = DistributedDataParallel(
        torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1))
    )
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    return model, opt, MonitorConfig(policy=PolicyConfig(margin=10, skip_ahead=30))


def _worker(rank: int, store: str, out: str) -> None:
    model, opt, config = _ddp_mlp(rank, store)
    guard = SpikeGuard(model=model, optimizer=opt, config=config, snapshot_every=10)
    losses = []
    for x, y in guard.batches(_shard(p, rank) for p in range(10_000)):
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()  # type: ignore[no-untyped-call]
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        guard.step(loss=loss, grad_norm=grad_norm)
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if guard.step_count >= STEPS:
            break
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    gathered = [torch.empty_like(flat) for _ in range(2)]
    dist.all_gather(gathered, flat)
    stats = guard.stats
    result = {
        "rank": rank,
        "rollbacks": stats["rollbacks"],
        "skipped_steps": stats["skipped_steps"],
        "ledger": stats["skip_ledger"],
        "step_count": guard.step_count,
        "identical": bool(torch.equal(gathered[0], gathered[1])),
        "final_loss": sum(losses[-20:]) / 20,
        "ranks": stats["last_incident_ranks"],
    }
    Path(out, f"rank{rank}.json").write_text(json.dumps(result))
    dist.barrier()
    # Leave without interpreter teardown: gloo's threads sometimes abort the process
    # ("terminate called without an active exception") when Python shuts down around them.
    os._exit(0)


def test_a_bad_shard_on_one_rank_rolls_back_every_rank_alike(tmp_path: Path) -> None:
    mp.spawn(_worker, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=2, join=True)  # type: ignore[attr-defined,no-untyped-call]
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["rollbacks"] >= 1
    assert r0["rollbacks"] == r1["rollbacks"]
    assert r0["skipped_steps"] == r1["skipped_steps"] >= 1  # the NaN step, on both ranks alike
    assert r0["ledger"] == r1["ledger"]
    assert r0["step_count"] == r1["step_count"] == STEPS
    assert r0["identical"] and r1["identical"]
    start, stop = r0["ledger"][0]
    assert start <= POISON.start and stop >= POISON.stop
    assert "rank(s) [1] saw it" in r0["ranks"]
    assert math.isfinite(r0["final_loss"]) and r0["final_loss"] < 1.0


def _early_worker(rank: int, store: str, out: str) -> None:
    """A script that builds everything first, then joins the process group."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1))
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2)
    config = MonitorConfig(policy=PolicyConfig(margin=10, skip_ahead=30))
    guard = SpikeGuard(model=net, optimizer=opt, config=config, snapshot_every=10)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    for p in net.parameters():  # what DDP does at construction: start from rank 0's weights
        dist.broadcast(p.data, src=0)
    for x, y in guard.batches(_shard(p, rank) for p in range(10_000)):
        loss = torch.nn.functional.mse_loss(net(x), y)
        loss.backward()  # type: ignore[no-untyped-call]
        for p in net.parameters():  # DDP's gradient average, by hand
            assert p.grad is not None
            dist.all_reduce(p.grad)
            p.grad /= 2
        grad_norm = torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        guard.step(loss=loss, grad_norm=grad_norm)
        opt.zero_grad(set_to_none=True)
        if guard.step_count >= STEPS:
            break
    flat = torch.cat([p.detach().reshape(-1) for p in net.parameters()])
    gathered = [torch.empty_like(flat) for _ in range(2)]
    dist.all_gather(gathered, flat)
    result = {
        "lockstep": guard.engine.lockstep is not None,
        "rollbacks": guard.stats["rollbacks"],
        "ledger": guard.stats["skip_ledger"],
        "identical": bool(torch.equal(gathered[0], gathered[1])),
    }
    Path(out, f"early{rank}.json").write_text(json.dumps(result))
    dist.barrier()
    os._exit(0)


def test_a_guard_built_before_init_process_group_joins_the_lockstep(tmp_path: Path) -> None:
    mp.spawn(_early_worker, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=2, join=True)  # type: ignore[attr-defined,no-untyped-call]
    r0, r1 = (json.loads((tmp_path / f"early{r}.json").read_text()) for r in (0, 1))
    assert r0["lockstep"] and r1["lockstep"]
    assert r0["rollbacks"] == r1["rollbacks"] >= 1  # the bad shard on rank 1: both roll back
    assert r0["ledger"] == r1["ledger"]
    assert r0["identical"] and r1["identical"]


def _approval_worker(rank: int, store: str, out: str, url: str) -> None:
    """Rank 0 reports to a service with manual approval; the operator approves."""
    model, opt, config = _ddp_mlp(rank, store)
    guard = SpikeGuard(
        model=model, optimizer=opt, config=config, snapshot_every=10, keep_snapshots=20,
        run_id="approve", monitor_url=url, token=SERVICE_TOKEN,
    )  # fmt: skip
    applied_at = -1
    for x, y in guard.batches(_shard(p, rank) for p in range(10_000)):
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()  # type: ignore[no-untyped-call]
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        before = guard.stats["rollbacks"]
        guard.step(loss=loss, grad_norm=grad_norm)
        opt.zero_grad(set_to_none=True)
        if guard.stats["rollbacks"] > before:
            applied_at = guard.engine.position  # the data position it was applied at
        if guard.engine.approvals.open is not None:
            time.sleep(0.02)  # a slow step while the operator decides (rank 0 polls)
        if guard.step_count >= STEPS:
            break
    guard.close()
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    gathered = [torch.empty_like(flat) for _ in range(2)]
    dist.all_gather(gathered, flat)
    result = {"rollbacks": guard.stats["rollbacks"], "applied_at": applied_at,
              "ledger": guard.stats["skip_ledger"],
              "identical": bool(torch.equal(gathered[0], gathered[1]))}  # fmt: skip
    Path(out, f"approve{rank}.json").write_text(json.dumps(result))
    dist.barrier()
    os._exit(0)


def _approve_when_proposed(svc: ServiceProcess, stop: threading.Event) -> None:
    while not stop.is_set():
        status, view = svc.get("/v1/runs/approve")
        proposed = [c for c in view.get("commands", []) if c["status"] == "proposed"]
        if status == 200 and proposed:
            svc.post(
                "/v1/runs/approve/commands", {"action": "approve", "command": proposed[0]["id"]}
            )
            return
        time.sleep(0.05)


def test_an_approved_rollback_is_applied_on_every_rank_at_one_step(tmp_path: Path) -> None:
    config = '[service]\napproval = "manual"\n'
    with ServiceProcess(tmp_path, config=config) as svc:
        stop = threading.Event()
        operator = threading.Thread(target=_approve_when_proposed, args=(svc, stop))
        operator.start()
        try:
            args = (str(tmp_path / "store"), str(tmp_path), svc.url)
            mp.spawn(_approval_worker, args=args, nprocs=2, join=True)  # type: ignore[attr-defined,no-untyped-call]
        finally:
            stop.set()
            operator.join()
        _, view = svc.get("/v1/runs/approve")
    r0, r1 = (json.loads((tmp_path / f"approve{r}.json").read_text()) for r in (0, 1))
    assert r0["rollbacks"] == r1["rollbacks"] == 1
    assert r0["applied_at"] == r1["applied_at"] > POISON.start  # the same step on both ranks
    assert r0["ledger"] == r1["ledger"] and r0["identical"] and r1["identical"]
    start, _ = r0["ledger"][0]
    assert start <= POISON.start  # from the pinned snapshot before the onset
    assert [c["status"] for c in view["commands"]] == ["applied"]
