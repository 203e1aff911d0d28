"""A peer rank that dies or stalls: the survivor gets `PeerFailureError`, not a hang.

Two gloo ranks (spawned processes, file store, a 5 s process-group timeout) train a DDP
model under `SpikeGuard`. At step ``FAIL_AT`` rank 1 fails right after its backward, so
DDP's gradient all-reduce has completed and the next collective is the guard's own
all-gather (that step is one where the guard gathers). Plain processes (not
``mp.spawn``, which raises when a child dies) with join timeouts bound the test even if
the guard hung.
"""

from __future__ import annotations

import multiprocessing
import os
import time
from datetime import timedelta
from pathlib import Path
from typing import Literal

import pytest
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from spikewatch_hooks.distributed.lockstep import PeerFailureError
from spikewatch_hooks.guard import SpikeGuard

TIMEOUT_S = 5.0  # the process group's timeout: bounds the wait for a stalled peer
# Rank 1 fails at a step where the guard hands records to the monitor (every
# monitor_every = 8 steps: after steps 7, 15, ...), so the guard's all-gather is the next
# collective rank 0 meets; at other steps it would be DDP's all-reduce in backward.
FAIL_AT = 5 * 8 - 1
JOIN_S = 60.0  # the whole test's bound: start-up, FAIL_AT steps, the timeout, exit
Failure = Literal["dies", "stalls"]


def _fail(failure: Failure) -> None:
    if failure == "dies":
        os._exit(3)  # no clean-up, no goodbye to the peers: a crash or an OOM kill
    time.sleep(10 * JOIN_S)  # alive but silent: a deadlock or a stuck data loader


def _worker(rank: int, store: str, out: str, failure: Failure) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{store}",
        rank=rank,
        world_size=2,
        timeout=timedelta(seconds=TIMEOUT_S),
    )
    torch.manual_seed(0)
    model = DistributedDataParallel(
        torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1))
    )
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    guard = SpikeGuard(model=model, optimizer=opt, snapshot_every=10)
    g = torch.Generator().manual_seed(rank)
    for x in guard.batches(torch.randn(32, 8, generator=g) for _ in range(10 * FAIL_AT)):
        loss = model(x).pow(2).mean()
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        if rank == 1 and guard.step_count == FAIL_AT:
            _fail(failure)
        start = time.monotonic()
        try:
            guard.step(loss=loss, grad_norm=grad_norm)
        except PeerFailureError as exc:
            waited = time.monotonic() - start
            Path(out, f"rank{rank}.txt").write_text(f"{waited:.3f}\n{exc}")
            # Skip the interpreter's teardown: with a dead peer, torch's gloo teardown
            # sometimes aborts (std::terminate, SIGABRT; ~1 run in 15 on a busy host),
            # with or without destroy_process_group. Not what this test is about.
            os._exit(0)
        opt.zero_grad(set_to_none=True)
    Path(out, f"rank{rank}.txt").write_text("finished without noticing the failure")


@pytest.mark.parametrize("failure", ["dies", "stalls"])
def test_a_failed_peer_raises_peer_failure_on_the_survivor(
    tmp_path: Path, failure: Failure
) -> None:
    ctx = multiprocessing.get_context("spawn")
    procs = [
        ctx.Process(target=_worker, args=(rank, str(tmp_path / "store"), str(tmp_path), failure))
        for rank in (0, 1)
    ]
    for p in procs:
        p.start()
    try:
        procs[0].join(JOIN_S)
        survivor_hung = procs[0].is_alive()
        procs[1].join(1.0 if failure == "dies" else 0.0)
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(5.0)
    assert not survivor_hung, f"rank 0 still waiting after {JOIN_S} s: the guard hung"
    assert procs[0].exitcode == 0
    if failure == "dies":
        assert procs[1].exitcode == 3
    waited, message = (tmp_path / "rank0.txt").read_text().split("\n", 1)
    assert float(waited) < TIMEOUT_S + 5.0
    assert message.startswith(f"rank 0/2: the guard's all-gather at step {FAIL_AT} failed (")
    assert "a peer rank probably died or stalled" in message
    assert "resume from the last checkpoint" in message
    assert not (tmp_path / "rank1.txt").exists()
